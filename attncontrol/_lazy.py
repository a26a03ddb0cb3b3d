"""Modules imported on first use, so that ``attncontrol --help``, ``attncontrol methods`` and the control
dataclasses load without torch (about two seconds on a small CPU)."""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING


class LazyModule(types.ModuleType):
    """Stands for ``name``; the first attribute access imports it."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_target"] = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__dict__["_target"])
        return getattr(module, attr)


if TYPE_CHECKING:  # the type checker sees the real modules and their types
    import numpy as np
    import torch
    import torch.nn.functional as F
else:
    torch = LazyModule("torch")
    F = LazyModule("torch.nn.functional")
    np = LazyModule("numpy")

__all__ = ["F", "LazyModule", "np", "torch"]
