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


def _tiny_blip_config(vocab_size: int):
    """A 2-layer, 32-wide BLIP (text and vision) over a WordPiece vocabulary of ``vocab_size`` ([DEC] at id 5)."""
    from transformers import BlipConfig

    text = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        encoder_hidden_size=32,
        pad_token_id=0,
        sep_token_id=3,
        eos_token_id=3,
        bos_token_id=5,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        initializer_range=0.02,  # BLIP's vision default (1e-10) would make every image look the same
    )
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=16)


def save_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random BLIP captioner (``BlipForConditionalGeneration`` + ``BlipProcessor`` with a small WordPiece
    vocabulary) for ``attncontrol eval --captioner``."""
    from transformers import BertTokenizer, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    (folder / "vocab.txt").write_text("\n".join(specials + _CAPTION_WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(_tiny_blip_config(len(specials) + len(_CAPTION_WORDS)))
    model.eval().save_pretrained(folder, safe_serialization=True)
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _bert_tokenizer(folder: Path, words: list[str]):
    """A WordPiece tokenizer over ``words`` (with BERT's special tokens and BLIP's ``[DEC]``), saved in ``folder``."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = specials + sorted(set(words) - set(specials))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]"), len(vocab)


def vqa_words() -> list[str]:
    """Every word of the built-in T2I-CompBench attribute sets, with "yes"/"no" and the caption words."""
    import re
    from importlib import resources

    words = set(_CAPTION_WORDS) | {"yes", "no", "?"}
    for name in ("color", "shape", "texture"):
        text = resources.files("attncontrol").joinpath(f"data/t2i_compbench_{name}_val.txt").read_text()
        words |= set(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))
    return sorted(words)


def save_tiny_blip_vqa(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random BLIP VQA model (``BlipForQuestionAnswering`` + ``BlipProcessor``) for ``attncontrol eval --vqa``;
    its vocabulary covers the T2I-CompBench attribute prompts."""
    from transformers import BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    tokenizer, size = _bert_tokenizer(folder, vqa_words())
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(_tiny_blip_config(size))
    with torch.no_grad():  # random weights give P(yes) ~ P(no): spread the two answers
        model.text_decoder.cls.predictions.decoder.weight[tokenizer.convert_tokens_to_ids(["yes", "no"])] *= 40
    model.eval().save_pretrained(folder, safe_serialization=True)
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_owlv2(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random OWLv2 detector (``Owlv2ForObjectDetection`` + ``Owlv2Processor``, 32 px input, 16 box queries)
    for ``attncontrol eval --detector``."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor

    Images: type  # one of two image processor classes, whichever this transformers has
    try:
        from transformers import Owlv2ImageProcessor as Images
    except ImportError:  # pragma: no cover - depends on whether torchvision is installed
        from transformers import Owlv2ImageProcessorPil as Images

    folder = Path(folder)
    torch.manual_seed(seed)
    text = _tiny_text_config().to_dict()
    text.pop("projection_dim", None)
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)).eval()
    with torch.no_grad():  # boxes at each patch's prior box, a little moved (random weights throw them off the image)
        model.box_head.dense2.weight *= 0.0025
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder, safe_serialization=True)
    images = Images(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=images, tokenizer=make_clip_tokenizer()).save_pretrained(folder)
    return folder
