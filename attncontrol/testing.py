"""Tiny Stable Diffusion pipelines built from configs, for tests, benchmarks and offline demos.

Nothing here downloads anything. The CLIP tokenizer is rebuilt from the BPE vocabulary that the
``open-clip-torch`` wheel ships (install it with ``pip install --no-deps open-clip-torch``); its token
ids equal Stable Diffusion's. Run ``python -m attncontrol.testing DIR`` to write a tiny SD 1.x-style
pipeline folder that ``attncontrol generate --model DIR`` can load.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"

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


def clip_bpe_path() -> Path:
    """Locate the CLIP BPE vocabulary shipped inside the open-clip-torch wheel, without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The offline CLIP tokenizer needs the vocabulary file shipped by open-clip-torch; install it with "
            "`pip install --no-deps open-clip-torch` (its dependencies would replace a CPU torch)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"open_clip is installed but {path} is missing")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character table used by GPT-2/CLIP byte-level BPE.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP ViT-L/14 tokenizer (49408 tokens) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return folder


@lru_cache(maxsize=1)
def _tokenizer_files_dir() -> Path:
    import tempfile

    return write_clip_tokenizer_files(Path(tempfile.mkdtemp(prefix="attncontrol-clip-tok-")))


def make_clip_tokenizer(sd2: bool = False):
    """A real CLIP tokenizer built offline. ``sd2=True`` pads with "!" (id 0) like SD 2.x's tokenizer."""
    from transformers import CLIPTokenizer

    folder = _tokenizer_files_dir()
    kwargs = {"pad_token": "!"} if sd2 else {"pad_token": EOT_TOKEN}
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=77,
        bos_token=SOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        **kwargs,
    )


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


def save_tiny_sd_pipeline(folder: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline (``family`` sd1, sd2 or sdxl) to ``folder`` in diffusers' layout (safetensors)."""
    folder = Path(folder)
    pipe = make_tiny_sdxl_pipeline(seed=seed) if family == "sdxl" else make_tiny_sd_pipeline(family=family, seed=seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attncontrol.testing", description="Write a tiny random SD pipeline folder (no download)."
    )
    parser.add_argument("folder")
    parser.add_argument("--family", choices=["sd1", "sd2", "sdxl"], default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_tiny_sd_pipeline(args.folder, family=args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} pipeline to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
