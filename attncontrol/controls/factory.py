"""The method registry: one name per method (its class's ``method``), in the CLI, batch manifests, traces, the app."""

from __future__ import annotations

from .astar import AStar
from .attend_excite import AttendExcite
from .boxdiff import BoxDiff
from .conform import Conform
from .divide_bind import DivideBind
from .initno import InitNO
from .refocus import Refocus
from .regulate import Regulate
from .syngen import SynGen

# The registry: each method has one name (its class's ``method``) in the CLI, batch manifests, traces and the UI.
METHODS = {
    cls.method: cls for cls in (AttendExcite, AStar, Refocus, Regulate, DivideBind, Conform, SynGen, BoxDiff, InitNO)
}
