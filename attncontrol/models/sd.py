"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline`` with a ``UNet2DConditionModel``)."""

from __future__ import annotations

import contextlib

import torch

from ..errors import ResolutionError
from ..processors.capture import find_attention_layers, layer_resolution
from ..store import EarlyExit


class SDAdapter:
    description = "StableDiffusionPipeline (SD 1.x and SD 2.x)"

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        return isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.unet, UNet2DConditionModel)

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = pipe.unet
        self.tokenizer = pipe.tokenizer
        self.layers = find_attention_layers(self.unet)

    @property
    def family(self) -> str:
        """ "sd2" when the tokenizer pads with something other than end-of-text (SD 2.x pads with "!")."""
        tok = self.tokenizer
        return "sd2" if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id else "sd1"

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def default_size(self) -> tuple[int, int]:
        size = int(self.unet.config.sample_size) * self.vae_scale_factor
        return size, size

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        for label, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % f:
                raise ResolutionError(f"{label} must be a positive multiple of {f} for this model, got {value!r}")
        return height // f, width // f

    def resolutions(self, latent_hw: tuple[int, int], kind: str = "cross") -> dict[str, tuple[int, int]]:
        return {la.name: layer_resolution(latent_hw, la.level) for la in self.layers if la.kind == kind}

    def default_attn_res(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The level 4x below the latents (16x16 at 512 px in SD 1.x/2.x) or, where that level has no
        cross-attention, the cross-attention level nearest to it."""
        levels = sorted({la.level for la in self.layers if la.kind == "cross"})
        if not levels:
            raise ResolutionError("this UNet has no cross-attention layers")
        level = min(levels, key=lambda lv: (abs(lv - 2), lv))
        return layer_resolution(latent_hw, level)

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_cfg, negative_prompt, clip_skip, lora_scale):
        return self.pipe.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

    def guidance_forward(self, latents: torch.Tensor, t, cond: torch.Tensor, cross_attention_kwargs=None) -> None:
        """Cond-only forward up to the last captured layer (the capture processors record the maps)."""
        x = latents
        if hasattr(self.pipe.scheduler, "scale_model_input"):
            x = self.pipe.scheduler.scale_model_input(x, t)
        with contextlib.suppress(EarlyExit):
            self.unet(
                x, t, encoder_hidden_states=cond, cross_attention_kwargs=cross_attention_kwargs, return_dict=False
            )
