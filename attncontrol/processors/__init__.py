"""Attention processors: capture (and later, editing) installed only on the layers a control needs."""

from .capture import CaptureProcessor, capture_layers, find_attention_layers, layer_resolution

__all__ = ["CaptureProcessor", "capture_layers", "find_attention_layers", "layer_resolution"]
