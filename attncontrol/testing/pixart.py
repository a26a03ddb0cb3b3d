"""A tiny PixArt-Sigma pipeline from configs (a cross-attention DiT over T5 text, 4 latent channels, learned
sigma, DPM-Solver): seconds per image on a CPU; and the full-size PixArt-Sigma transformer config."""

from __future__ import annotations

from typing import Any

import torch

from .mmdit import _tiny_t5
from .vocab import make_t5_tokenizer

# The full-size PixArt-Sigma XL/2 transformer (its published config: 28 blocks of 16 heads x 72, T5-XXL captions
# of 4096 channels, learned sigma), for benchmarks with random weights.
PIXART_SIGMA_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "use_additional_conditions": False,
}


def _tiny_vae_4():
    """A 4-channel VAE with diffusers' factor 8 (four blocks): the factor the pipeline's size bins assume."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=256,
    )


def make_tiny_pixart_pipeline(seed: int = 0, num_layers: int = 4):
    """A tiny random ``PixArtSigmaPipeline``: T5 (32 wide), a ``num_layers``-block ``PixArtTransformer2DModel``
    (2 heads x 8, patch 2, learned sigma: 8 output channels for 4 latent ones), a factor-8 VAE and the pipeline's
    DPM-Solver++ with PixArt's linear betas. ``sample_size`` is 32, the smallest the pipeline's resolution bins
    know: images are 256 px by default, latents 32x32, a 16x16 patch grid."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return PixArtSigmaPipeline(
        tokenizer=make_t5_tokenizer(max_length=300),
        text_encoder=_tiny_t5(),
        vae=_tiny_vae_4(),
        transformer=transformer,  # no dropout: train and eval mode agree
        scheduler=scheduler,
    )
