"""Controls: validated configuration dataclasses, one per method, that the API, CLI and UI all read."""

from .astar import AStar
from .attend_excite import AttendExcite
from .base import Control, ControlContext, PreparedControl, PreparedEditor, StepInfo
from .refocus import Refocus
from .regulate import Regulate

__all__ = [
    "AStar",
    "AttendExcite",
    "Control",
    "ControlContext",
    "PreparedControl",
    "PreparedEditor",
    "Refocus",
    "Regulate",
    "StepInfo",
]
