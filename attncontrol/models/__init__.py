"""Per-family adapters: the only code that knows a family's modules, latents, schedule and tokenizers."""

from __future__ import annotations

from ..errors import UnsupportedPipelineError
from .base import Encoded, ModelAdapter, PromptBatch
from .flux import FluxAdapter
from .flux2 import Flux2Adapter, Flux2KleinAdapter
from .pixart import PixArtAdapter
from .qwenimage import QwenImageAdapter
from .sana import SanaAdapter
from .sd import SDAdapter
from .sd3 import SD3Adapter
from .sdxl import SDXLAdapter
from .zimage import ZImageAdapter

# Most specific first. Adding a family = one adapter module + one entry here (and its tables in
# attncontrol.loading; see models/base.py).
ADAPTERS: list[type[ModelAdapter]] = [
    SDXLAdapter,
    SDAdapter,
    SD3Adapter,
    FluxAdapter,
    PixArtAdapter,
    QwenImageAdapter,
    ZImageAdapter,
    Flux2KleinAdapter,
    Flux2Adapter,
    SanaAdapter,
]


def adapter_class(pipeline_name: str) -> type[ModelAdapter] | None:
    """The adapter of a pipeline class name (as ``model_index.json`` records it), or None."""
    return next((a for a in ADAPTERS if pipeline_name in a.pipeline_names), None)


def get_adapter(pipe) -> ModelAdapter:
    """The adapter for ``pipe``'s family, or :class:`UnsupportedPipelineError` naming the supported ones."""
    for adapter in ADAPTERS:
        if adapter.matches(pipe):
            return adapter(pipe)
    supported = "; ".join(a.description for a in ADAPTERS)
    raise UnsupportedPipelineError(f"{type(pipe).__name__} is not supported; supported pipelines: {supported}")


__all__ = [
    "ADAPTERS",
    "Encoded",
    "Flux2Adapter",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "ModelAdapter",
    "PixArtAdapter",
    "PromptBatch",
    "QwenImageAdapter",
    "SD3Adapter",
    "SDAdapter",
    "SDXLAdapter",
    "ZImageAdapter",
    "SanaAdapter",
    "adapter_class",
    "get_adapter",
]
