"""Tiny Stable Diffusion 1.x / 2.x / XL pipelines from configs (seconds per image on a CPU), the full-size UNet
configs for benchmarks with random weights, and SD's usual schedulers."""

from __future__ import annotations

from typing import Any

import torch

from .vocab import make_clip_tokenizer

# The full-size SD 1.5 UNet architecture (from its published config), for benchmarks with random weights.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

# The full-size SDXL base UNet architecture (from its published config), for benchmarks with random weights.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}


def _tiny_vae(sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=2 * sample_size,
    )


def _tiny_text_config(**overrides):
    """A 5-layer, 32-wide CLIP text encoder config over the real 49408-token vocabulary."""
    from transformers import CLIPTextConfig

    config = dict(
        bos_token_id=49406,
        eos_token_id=49407,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    return CLIPTextConfig(**{**config, **overrides})


def make_tiny_sd_pipeline(
    family: str = "sd1",
    seed: int = 0,
    scheduler: str = "ddim",
    sample_size: int = 32,
    unet_overrides: dict[str, Any] | None = None,
):
    """A tiny random Stable Diffusion pipeline (seconds per image on a CPU).

    ``family="sd1"``: SD 1.x-style (conv projections, one head count, EOT padding).
    ``family="sd2"``: SD 2.x-style (linear projections, upcast attention, per-block head counts, "!" padding).
    The VAE downsamples by 2, so ``sample_size`` latents make ``2 * sample_size`` pixel images.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be 'sd1' or 'sd2', got {family!r}")
    torch.manual_seed(seed)
    unet_kwargs: dict[str, Any] = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "norm_num_groups": 32,
    }
    if family == "sd1":
        unet_kwargs["attention_head_dim"] = (2, 4)
    else:
        unet_kwargs.update(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    unet_kwargs.update(unet_overrides or {})
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = _tiny_vae(sample_size)
    text_encoder = CLIPTextModel(
        _tiny_text_config(
            pad_token_id=0 if family == "sd2" else 49407, hidden_act="gelu" if family == "sd2" else "quick_gelu"
        )
    ).eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_clip_tokenizer(sd2=family == "sd2"),
        unet=unet,
        scheduler=make_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "euler", sample_size: int = 32):
    """A tiny random SDXL base pipeline: two text encoders (the second with a projection, padding with "!"),
    pooled embeddings and size/crop conditioning, a 2-level UNet with 2 transformer layers at the lower level."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled
        cross_attention_dim=64,  # 32 + 32 from the two encoders
        norm_num_groups=32,
    )
    vae = _tiny_vae(sample_size)
    text_encoder = CLIPTextModel(_tiny_text_config(pad_token_id=49407)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(pad_token_id=0, projection_dim=32)).eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=make_clip_tokenizer(),
        tokenizer_2=make_clip_tokenizer(sd2=True),
        unet=unet,
        scheduler=make_scheduler(scheduler),
    )


def make_scheduler(name: str = "ddim"):
    """SD's usual scheduler settings (scaled-linear betas 0.00085..0.012) for ddim, pndm, euler, dpm."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "pndm":
        return PNDMScheduler(**common, skip_prk_steps=True, steps_offset=1)
    if name == "euler":
        return EulerDiscreteScheduler(**common, steps_offset=1)
    if name == "dpm":
        return DPMSolverMultistepScheduler(**common, steps_offset=1)
    raise ValueError(f"scheduler must be one of ddim, pndm, euler, dpm; got {name!r}")
