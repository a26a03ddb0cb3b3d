"""A tiny Z-Image pipeline from configs (``ZImagePipeline``: a single-stream transformer over [image; caption]
after per-modality refiner layers, a Qwen3 text encoder behind a chat template, flow matching): well under a second
per forward on a CPU. Nothing is downloaded: the tokenizer is the offline ChatML one of :mod:`.vocab`."""

from __future__ import annotations

import torch

from .mmdit import _tiny_vae_16
from .vocab import make_chatml_tokenizer

# The real Z-Image transformer's width (3840 wide, 30 heads of 128, its RoPE axes and caption width) with few
# layers, for memory benchmarks with random weights (the full 30 + 2 + 2 layers do not fit a small card).
ZIMAGE_WIDTH_CONFIG = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": (32, 48, 48),
    "axes_lens": (1024, 512, 512),
}


def _tiny_qwen3(vocab_size: int):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return Qwen3Model(config).eval()


def make_tiny_zimage_pipeline(seed: int = 0, n_layers: int = 3):
    """A tiny random ``ZImagePipeline``: a Qwen3 text encoder (32 wide, 2 layers; the pipeline reads its
    second-to-last hidden states), a ``ZImageTransformer2DModel`` 32 wide (2 heads of 16, RoPE axes 4+6+6) with one
    noise and one context refiner and ``n_layers`` main layers, the 16-channel tiny VAE (factor 8) and the
    flow-matching scheduler with Z-Image's shift. 64 px images are a 4x4 token grid (16 tokens, which the
    transformer pads to 32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
    from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline  # modules: the top level is a dummy

    torch.manual_seed(seed)
    tokenizer = make_chatml_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=n_layers,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64],
    )
    for name, param in transformer.named_parameters():  # zero-initialised pad tokens would hide their handling
        if name.endswith("pad_token"):
            torch.nn.init.normal_(param, std=0.5)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae_16(0.3611, 0.1159),
        text_encoder=_tiny_qwen3(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=transformer,
    )
