"""Tiny random evaluation models (CLIP, BLIP captioner) for ``attncontrol eval`` tests."""

from __future__ import annotations

from pathlib import Path

import torch

from .sd import _tiny_text_config
from .vocab import make_clip_tokenizer


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIP (``CLIPModel`` + ``CLIPProcessor``, 32 px images) for ``attncontrol eval --clip``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    torch.manual_seed(seed)
    text = _tiny_text_config(projection_dim=16).to_dict()
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=images, tokenizer=make_clip_tokenizer()).save_pretrained(folder)
    return folder


_CAPTION_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "photo",
    "cat",
    "dog",
    "bird",
    "bear",
    "red",
    "blue",
    "green",
    "bowl",
    "car",
    "clock",
    "apple",
    "chair",
    "on",
    "in",
]


def save_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random BLIP captioner (``BlipForConditionalGeneration`` + ``BlipProcessor`` with a small WordPiece
    vocabulary) for ``attncontrol eval --captioner``."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    (folder / "vocab.txt").write_text("\n".join(specials + _CAPTION_WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    text = dict(
        vocab_size=len(specials) + len(_CAPTION_WORDS), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32,
        pad_token_id=0, sep_token_id=3, eos_token_id=3, bos_token_id=5,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.eval().save_pretrained(folder, safe_serialization=True)
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder
