"""Controls: one module per method (its loss terms or edit, its options, its step plan), each registered by its
``@register`` line; this package imports every module in it, so a new method file is found without an edit here.
The methods' classes are attributes of this package by their class names (``attncontrol.controls.AttendExcite``).
"""

import importlib
import pkgutil

from .base import METHODS, Control, ControlContext, PreparedControl, PreparedEditor, register
from .boxes import parse_boxes
from .vocabulary import Evaluation, Row, StepInfo, StepPlan

# the seam's own modules; every other module here is a method
_INFRASTRUCTURE = {"base", "boxes", "common", "data", "fields", "options", "steps", "vocabulary"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

_CLASSES = {cls.__name__: cls for cls in METHODS.values()}
globals().update(_CLASSES)

__all__ = [
    "METHODS",
    "Control",
    "ControlContext",
    "Evaluation",
    "MapKey",
    "PreparedControl",
    "PreparedEditor",
    "Row",
    "StepInfo",
    "StepPlan",
    "parse_boxes",
    "register",
    *sorted(_CLASSES),
]
