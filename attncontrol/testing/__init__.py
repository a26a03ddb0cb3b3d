"""Tiny pipelines built from configs, for tests, benchmarks and offline demos.

Nothing here downloads anything. The CLIP tokenizer is rebuilt from the BPE vocabulary that the
``open-clip-torch`` wheel ships (install it with ``pip install --no-deps open-clip-torch``); its token ids equal
Stable Diffusion's. The T5-style tokenizer is trained offline on CLIP's words. Run
``python -m attncontrol.testing DIR [--family NAME]`` (one of :data:`FAMILIES`) to write a tiny pipeline folder
that ``attncontrol generate --model DIR`` can load.
"""

from __future__ import annotations

from pathlib import Path

from .eval_models import save_tiny_blip, save_tiny_blip_vqa, save_tiny_clip, save_tiny_owlv2
from .flux2 import FLUX2_WIDTH_CONFIG, make_tiny_flux2_klein_pipeline, make_tiny_flux2_pipeline
from .mmdit import FLUX_WIDTH_CONFIG, SD35_MEDIUM_CONFIG, make_tiny_flux_pipeline, make_tiny_sd3_pipeline
from .pixart import PIXART_SIGMA_CONFIG, make_tiny_pixart_pipeline
from .qwenimage import QWENIMAGE_WIDTH_CONFIG, make_tiny_qwenimage_pipeline
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
from .zimage import ZIMAGE_WIDTH_CONFIG, make_tiny_zimage_pipeline

# family name -> its tiny pipeline's builder (seed -> pipeline), one line per family
BUILDERS = {
    "sd1": lambda seed: make_tiny_sd_pipeline(family="sd1", seed=seed),
    "sd2": lambda seed: make_tiny_sd_pipeline(family="sd2", seed=seed),
    "sdxl": lambda seed: make_tiny_sdxl_pipeline(seed=seed),
    "sd3": lambda seed: make_tiny_sd3_pipeline(seed=seed),
    "sd35": lambda seed: make_tiny_sd3_pipeline(seed=seed, dual_attention=True),
    "flux": lambda seed: make_tiny_flux_pipeline(seed=seed),
    "pixart": lambda seed: make_tiny_pixart_pipeline(seed=seed),
    "qwenimage": lambda seed: make_tiny_qwenimage_pipeline(seed=seed),
    "zimage": lambda seed: make_tiny_zimage_pipeline(seed=seed),
    "flux2": lambda seed: make_tiny_flux2_pipeline(seed=seed),
    "klein": lambda seed: make_tiny_flux2_klein_pipeline(seed=seed),
    "sana": lambda seed: make_tiny_sana_pipeline(seed=seed),
}
FAMILIES = tuple(BUILDERS)


def make_tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A tiny random pipeline of ``family`` (one of :data:`FAMILIES`)."""
    if family not in BUILDERS:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    return BUILDERS[family](seed)


def save_tiny_pipeline(folder: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline of ``family`` to ``folder`` in diffusers' layout (safetensors)."""
    folder = Path(folder)
    make_tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder


save_tiny_sd_pipeline = save_tiny_pipeline  # the name earlier code and docs use

__all__ = [
    "EOT_TOKEN",
    "FAMILIES",
    "FLUX2_WIDTH_CONFIG",
    "FLUX_WIDTH_CONFIG",
    "PIXART_SIGMA_CONFIG",
    "QWENIMAGE_WIDTH_CONFIG",
    "SANA_1600M_CONFIG",
    "SD15_UNET_CONFIG",
    "SD35_MEDIUM_CONFIG",
    "SDXL_UNET_CONFIG",
    "SOT_TOKEN",
    "ZIMAGE_WIDTH_CONFIG",
    "clip_bpe_path",
    "make_clip_tokenizer",
    "make_gemma_tokenizer",
    "make_scheduler",
    "make_t5_tokenizer",
    "make_tiny_flux2_klein_pipeline",
    "make_tiny_flux2_pipeline",
    "make_tiny_flux_pipeline",
    "make_tiny_pipeline",
    "make_tiny_pixart_pipeline",
    "make_tiny_qwenimage_pipeline",
    "make_tiny_sd3_pipeline",
    "make_tiny_sana_pipeline",
    "make_tiny_sd_pipeline",
    "make_tiny_sdxl_pipeline",
    "make_tiny_zimage_pipeline",
    "save_tiny_blip",
    "save_tiny_blip_vqa",
    "save_tiny_clip",
    "save_tiny_owlv2",
    "save_tiny_pipeline",
    "save_tiny_sd_pipeline",
    "write_clip_tokenizer_files",
]
