"""Controls: validated configuration dataclasses, one per method, that the API, CLI and UI all read."""

from .astar import AStar
from .attend_excite import AttendExcite
from .base import Control, ControlContext, PreparedControl, PreparedEditor, StepInfo
from .factory import METHODS
from .refocus import Refocus, parse_boxes
from .regulate import Regulate

__all__ = [
    "METHODS",
    "AStar",
    "AttendExcite",
    "Control",
    "ControlContext",
    "PreparedControl",
    "PreparedEditor",
    "Refocus",
    "Regulate",
    "StepInfo",
    "parse_boxes",
]
