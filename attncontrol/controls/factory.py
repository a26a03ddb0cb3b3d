"""Controls by method name, for the CLI and batch runs (the Python API builds the dataclasses directly)."""

from __future__ import annotations

from typing import Any

from .astar import AStar
from .attend_excite import AttendExcite
from .refocus import Refocus
from .regulate import Regulate

# The registry: each method has one name (its class's ``method``) in the CLI, batch manifests, traces and the UI.
METHODS = {cls.method: cls for cls in (AttendExcite, AStar, Refocus, Regulate)}


def parse_methods(text: str) -> list[str]:
    """``"attend-excite+refocus"`` or ``"attend-excite,refocus"`` -> names; ``"none"`` -> [] (the baseline)."""
    names = [m.strip() for m in text.replace("+", ",").split(",") if m.strip()]
    if names == ["none"]:
        return []
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or names}; choose from none, {', '.join(METHODS)}")
    return names


def make_controls(
    names: list[str],
    subjects: list | None = None,
    boxes: dict | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> list:
    """One control per name; ``options[name]`` are that method's dataclass fields (e.g. ``max_iter_to_alter``)."""
    options = options or {}
    if boxes and "refocus" not in names:
        raise ValueError(f"boxes are for refocus, which is not among the methods {','.join(names) or 'none'}")
    if any(m != "refocus" for m in names) and not subjects:
        raise ValueError(f"subjects are required for {', '.join(m for m in names if m != 'refocus')}")
    controls = []
    for name in names:
        kwargs = dict(options.get(name, {}))
        if name == "refocus":
            if not boxes:
                raise ValueError("refocus needs boxes, e.g. 'cat=0.05,0.2,0.5,0.9;dog=0.55,0.2,0.95,0.9'")
            controls.append(Refocus(boxes=boxes, **kwargs))
        else:
            controls.append(METHODS[name](subjects=list(subjects), **kwargs))
    return controls
