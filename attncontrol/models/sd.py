"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline`` with a ``UNet2DConditionModel``).

An adapter is the only code that knows how its family encodes prompts and calls its denoiser; SDXL
(``sdxl.py``) subclasses this one and overrides just that.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ..errors import ResolutionError
from ..perf import checkpoint_layers
from ..processors.capture import find_attention_layers, layer_resolution
from ..store import EarlyExit


class SDAdapter:
    description = "StableDiffusionPipeline (SD 1.x and SD 2.x)"
    # pipeline arguments that this adapter consumes (they describe the prompt, which it encodes itself)
    consumed_kwargs: tuple[str, ...] = ()

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
    def exclude_eot_default(self) -> bool:
        """Whether A&E-style token softmaxes drop EOT/padding by default (the official SD 2.1 behaviour)."""
        return self.family == "sd2"

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def default_size(self) -> tuple[int, int]:
        size = int(self.unet.config.sample_size) * self.vae_scale_factor
        return size, size

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        step = math.lcm(f, 8)  # the VAE's factor, and the pipelines' own check (multiples of 8)
        for label, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % step:
                raise ResolutionError(f"{label} must be a positive multiple of {step} for this model, got {value!r}")
        return height // f, width // f

    def resolutions(self, latent_hw: tuple[int, int], kind: str = "cross") -> dict[str, tuple[int, int]]:
        return {la.name: layer_resolution(latent_hw, la.level) for la in self.layers if la.kind == kind}

    def default_attn_res(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The level 4x below the latents (16x16 at 512 px in SD 1.x/2.x, 32x32 at 1024 px in SDXL) or, where
        that level has no cross-attention, the cross-attention level nearest to it."""
        levels = sorted({la.level for la in self.layers if la.kind == "cross"})
        if not levels:
            raise ResolutionError("this UNet has no cross-attention layers")
        level = min(levels, key=lambda lv: (abs(lv - 2), lv))
        return layer_resolution(latent_hw, level)

    def secondary_prompts(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> list[tuple[Any, list[str]]]:
        """Other (tokenizer, prompts) pairs whose token positions must agree with the first tokenizer's."""
        return []

    def encode(
        self,
        prompts,
        device,
        num_images_per_prompt,
        do_cfg,
        negative_prompt,
        clip_skip,
        lora_scale,
        height,
        width,
        pipe_kwargs,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Encode once. Returns (the cond-branch inputs of a guidance forward, one tensor per key with the batch
        first; the embeddings to hand to the pipeline)."""
        cond, uncond = self.pipe.encode_prompt(
            prompts, device, num_images_per_prompt, do_cfg, negative_prompt, lora_scale=lora_scale, clip_skip=clip_skip
        )
        return {"encoder_hidden_states": cond}, {"prompt_embeds": cond, "negative_prompt_embeds": uncond}

    def input_scale(self, t) -> float:
        """The factor c with ``scheduler.scale_model_input(x, t) == c * x``: 1 for DDIM, PNDM, DPM-Solver (their
        latents are the model's input), ``1 / sqrt(sigma^2 + 1)`` for Euler, LMS, Heun, KDPM2 and the like.

        Guidance steps in the model's input space ``z = c * x`` and maps back (``x = z / c``), so the same model
        input gets the same update whatever the scheduler (a step on x with x's own gradient would move z by
        only c^2 of it: ~1/200 at SDXL's first sigma)."""
        scheduler = self.pipe.scheduler
        if not hasattr(scheduler, "scale_model_input"):
            return 1.0
        one = torch.ones((), dtype=torch.float64)
        scaled = scheduler.scale_model_input(one, t)
        return 1.0 if scaled is one else float(scaled)

    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        """Cond-only forward of the model input (already scaled) up to the last captured layer."""
        with contextlib.suppress(EarlyExit):
            self.unet(
                model_input, t, cross_attention_kwargs=attention_kwargs, return_dict=False,
                **self.unet_inputs(cond),
            )  # fmt: skip

    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]:
        """The denoiser's layers that a checkpointed guidance pass recomputes: those of the blocks that run
        entirely before the block holding ``last_layer`` (the forward stops there)."""
        return checkpoint_layers(self.unet, last_layer)

    @staticmethod
    def unet_inputs(cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}
