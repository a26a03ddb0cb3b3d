"""Tiny SD3 / SD3.5 and FLUX.1 pipelines from configs (joint-attention transformers, flow matching, a T5-style
text encoder with the offline T5-style tokenizer): seconds per image on a CPU."""

from __future__ import annotations

import torch

from .sd import _tiny_text_config
from .vocab import make_clip_tokenizer, make_t5_tokenizer

# The full-size SD3.5-medium transformer (its published config), for benchmarks with random weights.
SD35_MEDIUM_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
# FLUX.1's transformer block widths (24 heads x 128), with few blocks: the full model does not fit in 24 GB.
FLUX_WIDTH_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def _tiny_vae_16(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=64,
    )


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=8000,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def make_tiny_sd3_pipeline(seed: int = 0, dual_attention: bool = False, sample_size: int = 16):
    """A tiny random ``StableDiffusion3Pipeline``: CLIP-L and CLIP-G (16 wide each), T5 (32 wide), a 4-block joint
    transformer with RMS q/k norms. ``dual_attention=True`` gives blocks 0-1 SD3.5's extra image-only ``attn2``.
    Images are ``8 * sample_size`` pixels (128 by default: a 8x8 token grid)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=32,
        dual_attention_layers=(0, 1) if dual_attention else (),
        qk_norm="rms_norm",
    )
    text = dict(hidden_size=16, intermediate_size=37, num_attention_heads=2, projection_dim=16)
    encoders = [
        CLIPTextModelWithProjection(_tiny_text_config(pad_token_id=49407, **text)).eval(),
        CLIPTextModelWithProjection(_tiny_text_config(pad_token_id=0, **text)).eval(),
    ]
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae_16(1.5305, 0.0609),
        text_encoder=encoders[0],
        tokenizer=make_clip_tokenizer(),
        text_encoder_2=encoders[1],
        tokenizer_2=make_clip_tokenizer(sd2=True),
        text_encoder_3=_tiny_t5(),
        tokenizer_3=make_t5_tokenizer(),
    )


def make_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A tiny random ``FluxPipeline`` (dev-style with a guidance embedding; ``guidance_embeds=False``: schnell-
    style): CLIP (pooled, 16 wide), T5 (32 wide), 2 double-stream and 2 single-stream blocks with RoPE, the
    dynamic-shift flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    clip = CLIPTextModel(
        _tiny_text_config(pad_token_id=49407, hidden_size=16, intermediate_size=37, num_attention_heads=2)
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_tiny_vae_16(0.3611, 0.1159),
        text_encoder=clip,
        tokenizer=make_clip_tokenizer(),
        text_encoder_2=_tiny_t5(),
        tokenizer_2=make_t5_tokenizer(max_length=512),
        transformer=transformer,
    )
