"""Attention processors: the capture processor (install/restore), the recipients of its probabilities (the store's
recorder, the editors, the observer), and the attention forms the adapters pick per layer (the interface they
declare: :class:`AttentionForm`)."""

from .capture import CaptureProcessor, capture_layers
from .classic import CLASSIC, ClassicAttention
from .form import AttentionForm

__all__ = ["CLASSIC", "AttentionForm", "CaptureProcessor", "ClassicAttention", "capture_layers"]
