"""Shared benchmark helpers: full-size UNet architectures with random weights (no download)."""

from __future__ import annotations

import os
import platform
import resource
import time

import torch


def full_size_unet(dtype=torch.float32, arch: str = "sd15"):
    """The SD 1.5 or SDXL base UNet with random weights. SDXL's 2.6B parameters are filled with N(0, 0.02)
    directly (default initialisation of that many parameters takes minutes on a small CPU)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from attncontrol.testing import SD15_UNET_CONFIG, SDXL_UNET_CONFIG

    torch.manual_seed(0)
    if arch == "sd15":
        return UNet2DConditionModel(**SD15_UNET_CONFIG).to(dtype).eval()
    if arch != "sdxl":
        raise ValueError(f"arch must be sd15 or sdxl, got {arch!r}")
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet = unet.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02)
    return unet.eval()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
