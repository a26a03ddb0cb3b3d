"""Per-family adapters: the only code that knows how a family's denoiser is called."""

from __future__ import annotations

from ..errors import UnsupportedPipelineError
from .sd import SDAdapter
from .sdxl import SDXLAdapter

# Most specific first. Adding a family = one adapter module + one entry here.
ADAPTERS = [SDXLAdapter, SDAdapter]


def get_adapter(pipe):
    """The adapter for ``pipe``'s family, or :class:`UnsupportedPipelineError` naming the supported ones."""
    for adapter in ADAPTERS:
        if adapter.matches(pipe):
            return adapter(pipe)
    supported = "; ".join(a.description for a in ADAPTERS)
    raise UnsupportedPipelineError(f"{type(pipe).__name__} is not supported; supported pipelines: {supported}")


__all__ = ["ADAPTERS", "SDAdapter", "SDXLAdapter", "get_adapter"]
