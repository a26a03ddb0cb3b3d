"""Stable Diffusion XL (``StableDiffusionXLPipeline``, base model): two text encoders concatenated on channels
(their token positions must agree), pooled text embeddings and size/crop conditioning passed to the UNet as
``added_cond_kwargs``. Everything else is SD's."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import OptionError, OptionTypeError
from ..text import TextLayout, TextSegment
from .base import Encoded, PromptBatch
from .sd import SDAdapter


class SDXLAdapter(SDAdapter):
    description = "StableDiffusionXLPipeline (SDXL base)"
    modular_names = ("StableDiffusionXLModularPipeline",)
    modular_equal_lengths = True  # StableDiffusionXLInputStep.check_inputs
    pipeline_names = ("StableDiffusionXLPipeline",)
    consumed_kwargs = ("prompt_2", "negative_prompt_2")

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import UNet2DConditionModel
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
            StableDiffusionXLPipeline,  # its module: diffusers' top level is typed as a dummy
        )

        return isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.unet, UNet2DConditionModel)

    @property
    def tokenizer(self):
        # a text_encoder_2-only checkpoint: subjects are resolved with the second tokenizer
        return self.pipe.tokenizer if self.pipe.tokenizer is not None else self.pipe.tokenizer_2

    @property
    def family(self) -> str:
        return "sdxl"

    @property
    def exclude_eot_default(self) -> bool:
        # The first tokenizer pads with EOT, as in SD 1.x: keep diffusers' rule (EOT/padding stay in the softmax).
        return False

    # SDXL's size conditioning: (height, width) pairs, or (top, left) for the crops
    SIZE_KWARGS = (
        "original_size",
        "target_size",
        "crops_coords_top_left",
        "negative_original_size",
        "negative_target_size",
        "negative_crops_coords_top_left",
    )

    def check_pipe_kwargs(self, pipe_kwargs: dict[str, Any]) -> None:
        for name in self.SIZE_KWARGS:
            value = pipe_kwargs.get(name)
            if value is None:
                continue
            low = 0 if "crops" in name else 1
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)
            ):
                what = "(top, left) ints >= 0" if low == 0 else "(height, width) ints >= 1"
                raise OptionTypeError(f"{name} must be a pair {what}, got {value!r}")

    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return size, size

    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout:
        tok = self.tokenizer
        parallel: tuple[tuple[Any, tuple[str, ...]], ...] = ()
        if self.pipe.tokenizer is not None and self.pipe.tokenizer_2 is not None:
            prompt_2 = pipe_kwargs.get("prompt_2")
            prompts_2 = (
                prompts
                if prompt_2 is None
                else [prompt_2] * len(prompts)
                if isinstance(prompt_2, str)
                else (list(prompt_2))
            )
            if len(prompts_2) != len(prompts):
                raise OptionError(f"prompt_2 has {len(prompts_2)} prompts for {len(prompts)} prompts")
            parallel = ((self.pipe.tokenizer_2, tuple(prompts_2)),)
        return TextLayout((TextSegment(tok, 0, int(tok.model_max_length), tuple(prompts), parallel=parallel),))

    def encode(self, batch: PromptBatch, device) -> Encoded:
        pipe = self.pipe
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=batch.prompts,
            prompt_2=batch.extra.get("prompt_2"),
            device=device,
            num_images_per_prompt=batch.num_images_per_prompt,
            do_classifier_free_guidance=batch.do_cfg,
            negative_prompt=batch.negative_prompt,
            negative_prompt_2=batch.extra.get("negative_prompt_2"),
            lora_scale=batch.lora_scale,
            clip_skip=batch.clip_skip,
        )
        # the cond branch's size/crop conditioning, exactly as the pipeline computes it
        proj_dim = int(ppe.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        size = (batch.height, batch.width)
        time_ids = pipe._get_add_time_ids(
            tuple(batch.extra.get("original_size") or size),
            tuple(batch.extra.get("crops_coords_top_left") or (0, 0)),
            tuple(batch.extra.get("target_size") or size),
            dtype=pe.dtype,
            text_encoder_projection_dim=proj_dim,
        ).to(device)
        cond = {"encoder_hidden_states": pe, "text_embeds": ppe, "time_ids": time_ids.repeat(pe.shape[0], 1)}
        to_pipe = {
            "prompt_embeds": pe,
            "negative_prompt_embeds": npe,
            "pooled_prompt_embeds": ppe,
            "negative_pooled_prompt_embeds": nppe,
        }
        return Encoded(cond, to_pipe)

    @staticmethod
    def unet_inputs(cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
        }
