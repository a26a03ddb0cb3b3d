"""A tiny Qwen-Image pipeline from configs (``QwenImagePipeline``: a Qwen2.5-VL text encoder, the causal-3D
``AutoencoderKLQwenImage``, a double-stream ``QwenImageTransformer2DModel``), with the offline ChatML tokenizer:
well under a second per transformer forward on a CPU."""

from __future__ import annotations

import torch

from .vocab import make_chatml_tokenizer

# Qwen-Image's transformer block width (24 heads x 128 = 3072, text projected from Qwen2.5-VL-7B's 3584), with few
# blocks (the published model has 60): for memory benchmarks with random weights.
QWENIMAGE_WIDTH_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
# Qwen-Image's scheduler (its published scheduler_config.json): dynamic shift with an exponential time shift.
QWENIMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def _tiny_text_encoder(tokenizer):
    """A two-layer Qwen2.5-VL (its vision tower tiny too: the pipeline only runs the language model)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
        },
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _tiny_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()


def make_tiny_qwenimage_pipeline(seed: int = 0):
    """A tiny random ``QwenImagePipeline``: a 2-layer Qwen2.5-VL (32 wide) with the offline ChatML tokenizer, a
    4-channel VAE (8x down, as the published one), a 2-block double-stream transformer (2 heads x 16) with RoPE and
    RMS q/k norms, Qwen-Image's scheduler config. The pipeline's default size stays its own (1024 px): pass
    ``height=width=128`` (an 8x8 token grid) in tests."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tokenizer = make_chatml_tokenizer(max_length=1024)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER_CONFIG),
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )
