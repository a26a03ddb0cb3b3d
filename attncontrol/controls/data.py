"""Controls as plain JSON data and back, never pickles: ``{"method": "attend-excite", "subjects": [...], ...}``.

:func:`control_data` writes every field of a control (its dataclass fields, tuples as lists; dict keys become
text, as JSON has them); :func:`control_from_data` builds the control again through its own constructor, so
every field is checked and normalised as when a user types it (lists to tuples, ``"10"`` keys to ``10``), and an
unknown method or field is an :class:`~attncontrol.errors.OptionError` naming it. Used by the Modular Diffusers
block's saved config (:mod:`attncontrol.modular`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from ..errors import OptionError
from .base import METHODS, Control


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{k}]") for k, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"{where} is {value}, which JSON cannot hold")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise OptionError(f"{where} is a {type(value).__name__}, which has no JSON form")


def control_data(control: Control) -> dict[str, Any]:
    """``control`` as JSON data: its method's registry key and every field."""
    if not isinstance(control, Control):
        raise OptionError(f"expected an attncontrol control (e.g. AttendExcite(...)), got {control!r}")
    name = type(control).__name__
    data: dict[str, Any] = {"method": control.method}
    for f in dataclasses.fields(control):
        if f.init:
            data[f.name] = _plain(getattr(control, f.name), f"{name}.{f.name}")
    json.dumps(data)  # proves it is data
    return data


def control_from_data(data: dict[str, Any], where: str = "controls") -> Control:
    """The control :func:`control_data` wrote (its constructor checks every field)."""
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise OptionError(f"{where}: each control must be an object with a 'method' key, got {data!r}")
    method = data["method"]
    cls = METHODS.get(method)
    if cls is None:
        raise OptionError(f"{where}: unknown method {method!r}; choose from {', '.join(METHODS)}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names - {"method"})
    if unknown:
        raise OptionError(f"{where}: {method} has no field {', '.join(unknown)}")
    try:
        return cls(**{k: v for k, v in data.items() if k != "method"})
    except (TypeError, ValueError) as err:
        raise OptionError(f"{where}: {method}: {err}") from None


def controls_data(controls) -> list[dict[str, Any]]:
    return [control_data(c) for c in controls]


def controls_from_data(data, where: str = "controls") -> list[Control]:
    if not isinstance(data, list):
        raise OptionError(f"{where} must be a list of controls, got {type(data).__name__}")
    return [control_from_data(d, f"{where}[{k}]") for k, d in enumerate(data)]
