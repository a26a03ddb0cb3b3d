"""Controls: validated configuration dataclasses, one per method, that the API, CLI and UI all read."""

from .astar import AStar
from .attend_excite import AttendExcite
from .base import Control, ControlContext, PreparedControl, PreparedEditor, StepInfo
from .boxdiff import BoxDiff
from .conform import Conform
from .divide_bind import DivideBind
from .factory import METHODS
from .initno import InitNO
from .refocus import Refocus, parse_boxes
from .regulate import Regulate
from .syngen import SynGen

__all__ = [
    "METHODS",
    "AStar",
    "AttendExcite",
    "BoxDiff",
    "Conform",
    "Control",
    "ControlContext",
    "DivideBind",
    "InitNO",
    "PreparedControl",
    "PreparedEditor",
    "Refocus",
    "Regulate",
    "StepInfo",
    "SynGen",
    "parse_boxes",
]
