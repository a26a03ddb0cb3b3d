"""Attention processors: the capture processor (install/restore) and the per-architecture attention ops."""

from .capture import CaptureProcessor, capture_layers
from .classic import CLASSIC, ClassicAttention

__all__ = ["CLASSIC", "CaptureProcessor", "ClassicAttention", "capture_layers"]
