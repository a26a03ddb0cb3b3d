"""Tiny FLUX.2 [dev] and FLUX.2 [klein] pipelines from configs: a ``Flux2Transformer2DModel`` with 2 double-stream
and 2 single-stream ("parallel") blocks, a tiny ``AutoencoderKLFlux2``, FLUX.2's dynamic-shift flow-matching
scheduler, and a tiny LLM text encoder with an offline byte-level tokenizer and its chat template: seconds per image
on a CPU.

The encoders are as deep as the hidden-state indices the pipelines read by default (dev: layers 10, 20, 30 of
``Mistral3ForConditionalGeneration``; Klein: 9, 18, 27 of ``Qwen3ForCausalLM``; ``text_encoder_out_layers``), so
the saved folders run with the pipelines' defaults; each layer is 16 wide, so depth costs little.
"""

from __future__ import annotations

import torch

from .vocab import make_chatml_tokenizer, make_mistral_tokenizer

# FLUX.2 [dev]'s block widths (48 heads x 128, Mistral-3's 3 x 5120 text features, 4-axis RoPE), with few blocks:
# the full model (8 double- and 48 single-stream blocks) does not fit a 24 GB card; for memory benchmarks.
FLUX2_WIDTH_CONFIG = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "guidance_embeds": True,
}
_TEXT_WIDTH = 16  # the tiny encoders' hidden size: the transformer reads 3 stacked layers, 48 features


def _tiny_transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=3 * _TEXT_WIDTH,
        timestep_guidance_channels=16,
        mlp_ratio=3.0,
        axes_dims_rope=(2, 2, 2, 2),
        rope_theta=2000,
        guidance_embeds=guidance_embeds,
    )


def _tiny_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,
    )


def _scheduler():
    """FLUX.2's scheduler config: dynamic shifting (the pipeline computes ``mu`` from the image size and steps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def _tiny_mistral3():
    """A tiny ``Mistral3ForConditionalGeneration`` (the class FLUX.2 [dev] loads): 30 text layers 16 wide, a
    one-layer Pixtral vision tower that the text-only encode path never runs."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(
        vocab_size=6000,
        hidden_size=_TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=3,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8, image_size=32
    )
    config = Mistral3Config(text_config=text, vision_config=vision, vision_feature_layer=-1, spatial_merge_size=2)
    return Mistral3ForConditionalGeneration(config).eval()


def _tiny_qwen3():
    """A tiny ``Qwen3ForCausalLM`` (the class FLUX.2 [klein] loads): 28 layers 16 wide."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=6000,
        hidden_size=_TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
    )
    return Qwen3ForCausalLM(config).eval()


def make_tiny_flux2_pipeline(seed: int = 0):
    """A tiny random ``Flux2Pipeline`` (FLUX.2 [dev]: guidance embedding, no classifier-free guidance) with a tiny
    ``Mistral3ForConditionalGeneration`` and the offline Mistral-style tokenizer (system prompt and [INST] markers).
    At 128 px the token grid is 8x8."""
    from diffusers import Flux2Pipeline

    torch.manual_seed(seed)
    return Flux2Pipeline(
        scheduler=_scheduler(),
        vae=_tiny_vae(),
        text_encoder=_tiny_mistral3(),
        tokenizer=make_mistral_tokenizer(),
        transformer=_tiny_transformer(guidance_embeds=True),
    )


def make_tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """A tiny random ``Flux2KleinPipeline`` (FLUX.2 [klein] base: classifier-free guidance with the empty negative
    prompt; ``is_distilled=True``: the step-distilled kind, no CFG) with a tiny ``Qwen3ForCausalLM`` and the offline
    ChatML tokenizer (``enable_thinking`` switch)."""
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(seed)
    return Flux2KleinPipeline(
        scheduler=_scheduler(),
        vae=_tiny_vae(),
        text_encoder=_tiny_qwen3(),
        tokenizer=make_chatml_tokenizer(),
        transformer=_tiny_transformer(guidance_embeds=False),
        is_distilled=is_distilled,
    )
