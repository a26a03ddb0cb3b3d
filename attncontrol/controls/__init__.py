"""Controls: validated configuration dataclasses, one per method, that the API, CLI and UI all read."""

from .astar import AStar
from .attend_excite import AttendExcite
from .base import Control, ControlContext, PreparedControl, StepInfo
from .refocus import Refocus

__all__ = ["AStar", "AttendExcite", "Control", "ControlContext", "PreparedControl", "Refocus", "StepInfo"]
