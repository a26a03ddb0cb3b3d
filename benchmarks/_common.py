"""Shared benchmark helpers: the full-size SD 1.5 UNet architecture with random weights (no download)."""

from __future__ import annotations

import platform
import resource
import time

import torch


def full_size_unet(dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    from attncontrol.testing import SD15_UNET_CONFIG

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).to(dtype).eval()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
