"""Tiny pipelines built from configs, for tests, benchmarks and offline demos.

Nothing here downloads anything. The CLIP tokenizer is rebuilt from the BPE vocabulary that the
``open-clip-torch`` wheel ships (install it with ``pip install --no-deps open-clip-torch``); its token ids equal
Stable Diffusion's. The T5-style tokenizer is trained offline on CLIP's words. Run
``python -m attncontrol.testing DIR [--family sd1|sd2|sdxl|sd3|sd35|flux|sana]`` to write a tiny pipeline folder
that ``attncontrol generate --model DIR`` can load.
"""

from __future__ import annotations

from pathlib import Path

from .eval_models import save_tiny_blip, save_tiny_blip_vqa, save_tiny_clip, save_tiny_owlv2
from .mmdit import FLUX_WIDTH_CONFIG, SD35_MEDIUM_CONFIG, make_tiny_flux_pipeline, make_tiny_sd3_pipeline
from .sana import SANA_1600M_CONFIG, make_gemma_tokenizer, make_tiny_sana_pipeline
from .sd import SD15_UNET_CONFIG, SDXL_UNET_CONFIG, make_scheduler, make_tiny_sd_pipeline, make_tiny_sdxl_pipeline
from .vocab import (
    EOT_TOKEN,
    SOT_TOKEN,
    clip_bpe_path,
    make_clip_tokenizer,
    make_t5_tokenizer,
    write_clip_tokenizer_files,
)

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "sd35", "flux", "sana")


def make_tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A tiny random pipeline of ``family`` (one of :data:`FAMILIES`)."""
    if family in ("sd1", "sd2"):
        return make_tiny_sd_pipeline(family=family, seed=seed)
    if family == "sdxl":
        return make_tiny_sdxl_pipeline(seed=seed)
    if family in ("sd3", "sd35"):
        return make_tiny_sd3_pipeline(seed=seed, dual_attention=family == "sd35")
    if family == "flux":
        return make_tiny_flux_pipeline(seed=seed)
    if family == "sana":
        return make_tiny_sana_pipeline(seed=seed)
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")


def save_tiny_pipeline(folder: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline of ``family`` to ``folder`` in diffusers' layout (safetensors)."""
    folder = Path(folder)
    make_tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder


save_tiny_sd_pipeline = save_tiny_pipeline  # the name earlier code and docs use

__all__ = [
    "EOT_TOKEN",
    "FAMILIES",
    "FLUX_WIDTH_CONFIG",
    "SANA_1600M_CONFIG",
    "SD15_UNET_CONFIG",
    "SD35_MEDIUM_CONFIG",
    "SDXL_UNET_CONFIG",
    "SOT_TOKEN",
    "clip_bpe_path",
    "make_clip_tokenizer",
    "make_gemma_tokenizer",
    "make_scheduler",
    "make_t5_tokenizer",
    "make_tiny_flux_pipeline",
    "make_tiny_pipeline",
    "make_tiny_sd3_pipeline",
    "make_tiny_sana_pipeline",
    "make_tiny_sd_pipeline",
    "make_tiny_sdxl_pipeline",
    "save_tiny_blip",
    "save_tiny_blip_vqa",
    "save_tiny_clip",
    "save_tiny_owlv2",
    "save_tiny_pipeline",
    "save_tiny_sd_pipeline",
    "write_clip_tokenizer_files",
]
