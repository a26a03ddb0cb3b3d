"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline`` with a ``UNet2DConditionModel``).

SDXL (``sdxl.py``) subclasses this adapter and overrides what differs: its two text encoders, pooled embeddings
and size/crop conditioning.
"""

from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Any

import torch

from ..store import AttnLayer, EarlyExit
from ..text import TextLayout, TextSegment
from .base import Encoded, ModelAdapter, PromptBatch
from .unet import checkpoint_layers, unet_layers


class SDAdapter(ModelAdapter):
    description = "StableDiffusionPipeline (SD 1.x and SD 2.x)"
    pipeline_names = ("StableDiffusionPipeline",)

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import UNet2DConditionModel
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            StableDiffusionPipeline,  # its module: diffusers' top level is typed as a dummy
        )

        return isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.unet, UNet2DConditionModel)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @cached_property
    def layers(self) -> list[AttnLayer]:
        """The UNet's attention layers, each with the classic attention form (``unet_layers`` gives CLASSIC)."""
        return unet_layers(self.pipe.unet)

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def family(self) -> str:
        """ "sd2" when the tokenizer pads with something other than end-of-text (SD 2.x pads with "!")."""
        tok = self.tokenizer
        return "sd2" if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id else "sd1"

    @property
    def exclude_eot_default(self) -> bool:
        """The official SD 2.1 behaviour drops EOT/padding ("!") from A&E's token softmax; diffusers' keeps them."""
        return self.family == "sd2"

    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.unet.config.sample_size) * self.vae_scale_factor
        return size, size

    def latent_shape(self, n: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        return (n, int(self.pipe.unet.config.in_channels), *latent_hw)

    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra=None) -> bool:
        # the pipeline's rule: no CFG at scale <= 1, nor for guidance-distilled UNets (LCM's time_cond_proj_dim)
        return guidance_scale > 1.0 and not getattr(self.pipe.unet.config, "time_cond_proj_dim", None)

    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout:
        tok = self.tokenizer
        return TextLayout((TextSegment(tok, 0, int(tok.model_max_length), tuple(prompts)),))

    def encode(self, batch: PromptBatch, device) -> Encoded:
        negative = batch.negative_prompt
        if isinstance(negative, str):  # the prompts are a list here; SD's encode_prompt wants the same type
            negative = [negative] * len(batch.prompts)
        cond, uncond = self.pipe.encode_prompt(
            batch.prompts,
            device,
            batch.num_images_per_prompt,
            batch.do_cfg,
            negative,
            lora_scale=batch.lora_scale,
            clip_skip=batch.clip_skip,
        )
        return Encoded({"encoder_hidden_states": cond}, {"prompt_embeds": cond, "negative_prompt_embeds": uncond})

    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        with contextlib.suppress(EarlyExit):
            self.pipe.unet(
                model_input, t, cross_attention_kwargs=attention_kwargs, return_dict=False, **self.unet_inputs(cond)
            )

    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]:
        return checkpoint_layers(self.pipe.unet, last_layer)

    @staticmethod
    def unet_inputs(cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}
