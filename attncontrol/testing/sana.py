"""A tiny SANA pipeline (``SanaPipeline``) built from configs, and an offline Gemma-style tokenizer.

The tokenizer tokenises as Gemma's does (diffusers' ``SanaPipeline`` takes ``GemmaTokenizer | GemmaTokenizerFast``):
a BPE over text whose spaces are replaced by ``\u2581`` (so ``\u2581`` marks a word after a space and the first word
has no marker: no dummy prefix), ``<bos>`` added at the start, no ``<eos>``, ``<pad>`` padding, byte-fallback pieces.
Its merges are learnt offline on CLIP's words (each seen with and without its leading space), as
:mod:`attncontrol.testing.vocab` learns its tokenizers'.
"""

from __future__ import annotations

import json
from functools import lru_cache

from .vocab import _clip_words

# diffusers' ``SanaTransformer2DModel`` defaults are the SANA 1.6B (1024 px) transformer; spelled out here for a
# memory benchmark with random weights (caption_channels: Gemma-2 2B's hidden size).
SANA_1600M_CONFIG: dict = {
    "in_channels": 32,
    "out_channels": 32,
    "num_attention_heads": 70,
    "attention_head_dim": 32,
    "num_layers": 20,
    "num_cross_attention_heads": 20,
    "cross_attention_head_dim": 112,
    "cross_attention_dim": 2240,
    "caption_channels": 2304,
    "mlp_ratio": 2.5,
    "dropout": 0.0,
    "attention_bias": False,
    "sample_size": 32,
    "patch_size": 1,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
}
# The SANA checkpoints' scheduler: DPM-Solver++ (2M) on flow-matching sigmas, shifted by 3.
SANA_SCHEDULER_CONFIG: dict = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "num_train_timesteps": 1000,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
}
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's ids 0-4


@lru_cache(maxsize=1)
def _gemma_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train (once per process, a few seconds) a BPE on CLIP's words: vocab (Gemma's specials, the 256 byte-fallback
    pieces, then the learnt pieces) and merges."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    # training only: pieces never span a word boundary, so the merges never join across "\u2581" at inference
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=6000, initial_alphabet=alphabet, show_progress=False)
    words = _clip_words()
    tok.train_from_iterator((f"{w} {w}" for w in words), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(_SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for m in model["merges"]:  # "a b" in older tokenizers files, ["a", "b"] in newer ones
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        merges.append((left, right))
    return vocab, merges


def make_gemma_tokenizer(max_length: int = 512):
    """A Gemma-style tokenizer built offline (see the module docstring), as ``GemmaTokenizerFast``."""
    from transformers import GemmaTokenizerFast  # type: ignore[attr-defined]

    vocab, merges = _gemma_vocab()
    return GemmaTokenizerFast(
        vocab=dict(vocab),
        merges=list(merges),
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=max_length,
        padding_side="right",
    )


def make_tiny_sana_pipeline(seed: int = 0, qk_norm: str | None = None):
    """A tiny random ``SanaPipeline``: a 2-layer ``Gemma2Model``, the Gemma-style tokenizer, a 6-level
    ``AutoencoderDC`` (factor 32, as SANA's), a 3-block transformer with ``sample_size`` 16 (the pipeline's 512 px
    resolution bins) and SANA's scheduler. ``qk_norm``: the transformer's q/k norm (SANA 1.5's
    ``"rms_norm_across_heads"``)."""
    import torch
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = make_gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(4, 4, 4, 4, 4, 4),
        decoder_block_out_channels=(4, 4, 4, 4, 4, 4),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (), (), ()),
        decoder_qkv_multiscales=((), (), (), (), (), ()),
    )
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=3,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=16,
        qk_norm=qk_norm,
    )
    scheduler = DPMSolverMultistepScheduler(**SANA_SCHEDULER_CONFIG)
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
