"""FLUX.1 dev and schnell (``FluxPipeline`` with a ``FluxTransformer2DModel``): an MMDiT with 19 double-stream
blocks (text and image projected separately, one softmax over [text; image]) then 38 single-stream blocks (one
sequence [text; image]), rotary position embeddings, T5 text only (CLIP gives a pooled vector), latents packed
2x2 into a sequence, flow matching with a resolution-dependent shift (``mu``), and for dev a guidance embedding
(``guidance_scale``) instead of classifier-free guidance; true CFG only with ``true_cfg_scale`` > 1 and a negative
prompt, as a second forward.

Captured maps (at the packed token grid, H/16 x W/16): "cross", the image->text part of each block's joint
softmax; "self", its image->image part renormalised over the image keys. ``blocks=`` numbers the double-stream
blocks 0-18 and the single-stream blocks 19-56; the default is the double-stream blocks, as FOCUS uses.
"""

from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Any

import torch

from ..loading import TOKEN_STREAMS
from ..processors.joint import ROTARY_JOINT
from ..store import AttnLayer, EarlyExit
from ..text import TextLayout, TextSegment
from .base import Encoded, PackedLatents, PromptBatch, joint_layers
from .sd3 import _per_prompt


class FluxAdapter(PackedLatents):
    description = "FluxPipeline (FLUX.1 dev and schnell)"
    modular_names = ("FluxModularPipeline",)
    modular_guidance = None  # no guider: guidance_scale is the distilled guidance embedding, an input
    pipeline_names = ("FluxPipeline",)
    token_streams = TOKEN_STREAMS["FluxPipeline"]
    consumed_kwargs = ("prompt_2", "negative_prompt_2")
    attention_kwargs_name = "joint_attention_kwargs"
    flow_matching = True

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import FluxTransformer2DModel
        from diffusers.pipelines.flux.pipeline_flux import (
            FluxPipeline,  # its module: diffusers' top level is typed as a dummy
        )

        return isinstance(pipe, FluxPipeline) and isinstance(pipe.transformer, FluxTransformer2DModel)

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        self.guidance_scale: float | None = None
        self.text_ids: torch.Tensor | None = None

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @cached_property
    def layers(self) -> list[AttnLayer]:
        t = self.pipe.transformer
        blocks = [f"transformer_blocks.{i}" for i in range(len(t.transformer_blocks))]
        blocks += [f"single_transformer_blocks.{j}" for j in range(len(t.single_transformer_blocks))]
        # FLUX's attention form, for both kinds of block: ROTARY_JOINT tells a single-stream block (text already in
        # the sequence) from a double-stream one (text passed apart) by the call's arguments
        return joint_layers(blocks, ROTARY_JOINT)

    def default_blocks(self) -> dict[str, tuple[int, ...]]:
        double = tuple(range(len(self.pipe.transformer.transformer_blocks)))
        return {"cross": double, "self": double}

    @property
    def tokenizer(self):
        return self.pipe.tokenizer_2

    @property
    def exclude_eot_default(self) -> bool:
        # FLUX attends to T5's padding; left in, hundreds of "<pad>" positions would dilute every token softmax
        return True

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # the 2x2 packing

    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return size, size

    @property
    def channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels) // 4

    def latent_shape(self, n: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        return (n, (latent_hw[0] // 2) * (latent_hw[1] // 2), self.channels * 4)

    def initial_latents(self, n: int, latent_hw, generator, device, dtype) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor((n, self.channels, *latent_hw), generator=generator, device=device, dtype=dtype)
        return self.pipe._pack_latents(noise, n, self.channels, *latent_hw)

    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra=None) -> bool:
        """True CFG (FLUX's guidance is an embedding): ``true_cfg_scale`` > 1 and a negative prompt."""
        return float((extra or {}).get("true_cfg_scale", 1.0)) > 1.0 and negative_prompt is not None

    def cfg_batched(self, do_cfg: bool) -> bool:
        return False  # the negative branch is a second forward, after the positive one

    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout:
        t5_prompts = _per_prompt(pipe_kwargs.get("prompt_2"), prompts, "prompt_2")
        segment = TextSegment(self.pipe.tokenizer_2, 0, self.max_sequence_length(pipe_kwargs), t5_prompts, "T5")
        return TextLayout((segment,))

    def schedule(self, num_inference_steps, device, timesteps=None, sigmas=None, latent_hw=None, extra=None):
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        config = self.pipe.scheduler.config
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if config.get("use_flow_sigmas", False):
            sigmas = None
        seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        mu = calculate_shift(
            seq,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return retrieve_timesteps(self.pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def encode(self, batch: PromptBatch, device) -> Encoded:
        pipe, max_len = self.pipe, self.max_sequence_length(batch.extra)
        pe, ppe, self.text_ids = pipe.encode_prompt(
            prompt=batch.prompts,
            prompt_2=batch.extra.get("prompt_2"),
            device=device,
            num_images_per_prompt=batch.num_images_per_prompt,
            max_sequence_length=max_len,
            lora_scale=batch.lora_scale,
        )
        self.guidance_scale = batch.guidance_scale
        to_pipe = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        if batch.do_cfg:
            negative = batch.negative_prompt
            negative = [negative] * len(batch.prompts) if isinstance(negative, str) else negative
            npe, nppe, _ = pipe.encode_prompt(
                prompt=negative,
                prompt_2=batch.extra.get("negative_prompt_2"),
                device=device,
                num_images_per_prompt=batch.num_images_per_prompt,
                max_sequence_length=max_len,
                lora_scale=batch.lora_scale,
            )
            to_pipe.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        return Encoded({"encoder_hidden_states": pe, "pooled_projections": ppe}, to_pipe)

    def append_text(self, base: Encoded, parts: list[Encoded], do_cfg: bool) -> Encoded:
        """The sub-prompts' T5 tokens after the base's; FLUX's text ids are all zero (``encode_prompt``), so the
        longer sequence gets zero ids too, as the pipeline gives them for the longer ``prompt_embeds``."""
        joined = super().append_text(base, parts, do_cfg)
        pe = joined.cond["encoder_hidden_states"]
        self.text_ids = pe.new_zeros(pe.shape[1], 3)
        return joined

    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        transformer = self.pipe.transformer
        b, seq = model_input.shape[:2]
        timestep = torch.as_tensor(t, device=model_input.device).expand(b).to(model_input.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            scale = self.guidance_scale
            assert scale is not None  # encode() keeps the run's scale (prepare_run fills in the pipeline's default)
            guidance = torch.full([b], float(scale), device=model_input.device, dtype=torch.float32)
        grid = self.grid_of(seq)
        img_ids = self.pipe._prepare_latent_image_ids(b, *grid, model_input.device, model_input.dtype)
        with contextlib.suppress(EarlyExit):
            transformer(
                hidden_states=model_input,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=cond["pooled_projections"],
                encoder_hidden_states=cond["encoder_hidden_states"],
                txt_ids=self.text_ids,
                img_ids=img_ids,
                joint_attention_kwargs=attention_kwargs,
                return_dict=False,
            )

    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]:
        """The blocks (double- then single-stream) before the one holding ``last_layer``."""
        t = self.pipe.transformer
        return self.blocks_before([*t.transformer_blocks, *t.single_transformer_blocks], last_layer)
