"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel``): an MMDiT whose
joint attention runs one softmax over [image tokens; text tokens], the text being CLIP-L + CLIP-G (77 positions,
concatenated on channels) followed by T5 (``max_sequence_length`` positions); flow matching, no input scaling.

Captured maps (all at the patch grid, H/16 x W/16):

- "cross": the image->text part of each joint block's softmax over all keys (``transformer_blocks.{i}.attn``);
  default: every joint block, as FOCUS (Attend-and-Excite on SD3) averages them;
- "self": SD3.5's image-only ``attn2`` (blocks that have one, 0-12 in SD3.5 medium); in SD3 (no ``attn2``) the
  image->image part of the joint attention, renormalised over the image keys.
"""

from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Any

import torch

from ..errors import OptionError
from ..loading import TOKEN_STREAMS
from ..processors.joint import JOINT
from ..store import AttnLayer, EarlyExit
from ..text import TextLayout, TextSegment
from .base import Encoded, ModelAdapter, PromptBatch


def _per_prompt(value, prompts: list[str], label: str) -> tuple[str, ...]:
    if value is None:
        return tuple(prompts)
    values = [value] * len(prompts) if isinstance(value, str) else list(value)
    if len(values) != len(prompts):
        raise OptionError(f"{label} has {len(values)} prompts for {len(prompts)} prompts")
    return tuple(values)


class SD3Adapter(ModelAdapter):
    description = "StableDiffusion3Pipeline (SD3, SD3.5 medium and large)"
    modular_names = ("StableDiffusion3ModularPipeline",)
    pipeline_names = ("StableDiffusion3Pipeline",)
    token_streams = TOKEN_STREAMS["StableDiffusion3Pipeline"]
    consumed_kwargs = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3")
    attention_kwargs_name = "joint_attention_kwargs"
    flow_matching = True

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import SD3Transformer2DModel
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            StableDiffusion3Pipeline,  # its module: diffusers' top level is typed as a dummy
        )

        return isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.transformer, SD3Transformer2DModel)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @cached_property
    def layers(self) -> list[AttnLayer]:
        """The joint blocks' layers, each with SD3's attention form (JOINT: image tokens first, no rotary)."""
        layers = []
        for i, block in enumerate(self.pipe.transformer.transformer_blocks):
            name, label = f"transformer_blocks.{i}.attn.processor", f"transformer_blocks.{i}"
            layers.append(AttnLayer(name, "cross", label, 1, 2 * i, JOINT, name, i))
            if getattr(block, "attn2", None) is not None:
                second = f"transformer_blocks.{i}.attn2.processor"
                layers.append(AttnLayer(second, "self", label, 1, 2 * i + 1, JOINT, second, i))
        if not any(la.kind == "self" for la in layers):  # SD3: the joint attention's image->image part
            layers += [
                AttnLayer(f"{la.name}#self", "self", la.block, 1, la.order, JOINT, la.processor, la.block_index)
                for la in list(layers)
            ]
        return sorted(layers, key=lambda la: (la.order, la.kind))

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def exclude_eot_default(self) -> bool:
        # EOS and padding (hundreds of T5 "<pad>" positions) would dilute every token softmax: left out.
        return True

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return size, size

    def latent_shape(self, n: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        return (n, int(self.pipe.transformer.config.in_channels), *latent_hw)

    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra=None) -> bool:
        return guidance_scale > 1.0

    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout:
        pipe = self.pipe
        clip_len = int(pipe.tokenizer_max_length)
        parallel: tuple[tuple[Any, tuple[str, ...]], ...] = ()
        if pipe.tokenizer_2 is not None:
            parallel = ((pipe.tokenizer_2, _per_prompt(pipe_kwargs.get("prompt_2"), prompts, "prompt_2")),)
        clip = TextSegment(pipe.tokenizer, 0, clip_len, tuple(prompts), "CLIP", parallel)
        t5_prompts = _per_prompt(pipe_kwargs.get("prompt_3"), prompts, "prompt_3")
        tokenizer_3 = pipe.tokenizer_3 if pipe.text_encoder_3 is not None else None  # None: zeros, no tokens
        t5 = TextSegment(tokenizer_3, clip_len, self.max_sequence_length(pipe_kwargs), t5_prompts, "T5")
        return TextLayout((clip, t5))

    def schedule(self, num_inference_steps, device, timesteps=None, sigmas=None, latent_hw=None, extra=None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        extra = extra or {}
        config = self.pipe.scheduler.config
        kwargs = {}
        if extra.get("mu") is not None:
            kwargs["mu"] = extra["mu"]
        elif config.get("use_dynamic_shifting", None):
            seq = (latent_hw[0] // self.patch_size) * (latent_hw[1] // self.patch_size)
            kwargs["mu"] = calculate_shift(
                seq,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return retrieve_timesteps(self.pipe.scheduler, num_inference_steps, device, sigmas=sigmas, **kwargs)

    def encode(self, batch: PromptBatch, device) -> Encoded:
        pe, npe, ppe, nppe = self.pipe.encode_prompt(
            prompt=batch.prompts,
            prompt_2=batch.extra.get("prompt_2"),
            prompt_3=batch.extra.get("prompt_3"),
            device=device,
            num_images_per_prompt=batch.num_images_per_prompt,
            do_classifier_free_guidance=batch.do_cfg,
            negative_prompt=batch.negative_prompt,
            negative_prompt_2=batch.extra.get("negative_prompt_2"),
            negative_prompt_3=batch.extra.get("negative_prompt_3"),
            clip_skip=batch.clip_skip,
            max_sequence_length=self.max_sequence_length(batch.extra),
            lora_scale=batch.lora_scale,
        )
        to_pipe = {
            "prompt_embeds": pe,
            "negative_prompt_embeds": npe,
            "pooled_prompt_embeds": ppe,
            "negative_pooled_prompt_embeds": nppe,
        }
        return Encoded({"encoder_hidden_states": pe, "pooled_projections": ppe}, to_pipe)

    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        timestep = torch.as_tensor(t, device=model_input.device).expand(model_input.shape[0])
        with contextlib.suppress(EarlyExit):
            self.pipe.transformer(
                hidden_states=model_input,
                timestep=timestep,
                encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"],
                joint_attention_kwargs=attention_kwargs,
                return_dict=False,
            )

    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]:
        """The joint blocks before the one holding ``last_layer``."""
        return self.blocks_before(self.pipe.transformer.transformer_blocks, last_layer)
