"""Controls: validated configuration dataclasses, one per method, that the API, CLI and UI all read."""

from .attend_excite import AttendExcite
from .base import Control, ControlContext, PreparedControl, StepInfo

__all__ = ["AttendExcite", "Control", "ControlContext", "PreparedControl", "StepInfo"]
