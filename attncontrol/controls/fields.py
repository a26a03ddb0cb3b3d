"""A method option is a dataclass field that carries its own help, range, unit and published aliases.

``scale_factor: float = option(20.0, "the step size's factor", low=0, open_low=True)`` is the whole definition:
the validator (:func:`~attncontrol.controls.options.check_fields`), ``attncontrol methods``, the command line's
``--set``, batch files, the app's bounds and the README's option tables all read it from the field's metadata.
Torch-free, like the rest of the control dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError
from ..limits import MAX_ITERATIONS

META = "attncontrol"  # the key of our entry in a field's metadata


@dataclass(frozen=True)
class Range:
    """An interval of numbers; ``None`` ends are open to infinity. ``open_low`` / ``open_high`` exclude the end."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))

    def text(self) -> str:
        """The range as the error messages and the help say it: ">= 0", "> 0", "between 0 and 1", "in (0, 1]"."""
        lo, hi = _num(self.low), _num(self.high)
        if self.high is None:
            return f"> {lo}" if self.open_low else f">= {lo}"
        if self.low is None:
            return f"< {hi}" if self.open_high else f"<= {hi}"
        if not (self.open_low or self.open_high):
            return f"between {lo} and {hi}"
        return f"in {'(' if self.open_low else '['}{lo}, {hi}{')' if self.open_high else ']'}"


def _num(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


@dataclass(frozen=True)
class Meta:
    """What an option says about itself (see :func:`option`)."""

    help: str = ""
    range: Range | None = None
    items: Range | None = None
    keys: Range | None = None
    choices: tuple[str, ...] | None = None
    unit: str | None = None
    aliases: tuple[str, ...] = ()
    app: tuple[float, float] | None = None
    check: Callable[[Any, str], Any] | None = None
    option: bool = True


COUNT = Range(0, MAX_ITERATIONS)  # any count of iterations a method option sets (see attncontrol.limits)
POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    range: Range | None = None,
    items: Range | None = None,
    keys: Range | None = None,
    choices: tuple[str, ...] | None = None,
    unit: str | None = None,
    aliases: tuple[str, ...] = (),
    app: tuple[float, float] | None = None,
    check: Callable[[Any, str], Any] | None = None,
    kw_only: bool | None = None,
    user_option: bool = True,
) -> Any:
    """A dataclass field with its metadata.

    Args:
        default, factory: the default value, or a function that makes it (mutable defaults).
        help: one or two sentences: what the option does and its published value.
        low, high, open_low, open_high (or ``range``): the numbers a scalar option takes.
        items: the range of each item of a tuple, or each value of a dict; ``keys``: of each key of a dict.
        choices: the words a text option takes.
        unit: "steps" (a step index or a fraction of the schedule), "grid cells", "iterations", ...
        aliases: the names the method's paper or official code gives this option (accepted as keywords).
        app: the app's narrower bounds (a public demo must not run for hours); default: ``range``.
        check: ``check(value, label) -> value``: a rule the fields above cannot say (raises OptionError naming
            ``label``), returning the value normalised.
        user_option: False for fields given otherwise (``subjects``, ``boxes``).
    """
    if range is None and (low is not None or high is not None):
        range = Range(low, high, open_low, open_high)
    meta = Meta(
        help=" ".join(help.split()),
        range=range,
        items=items,
        keys=keys,
        choices=choices,
        unit=unit,
        aliases=tuple(aliases),
        app=app,
        check=check,
        option=user_option,
    )
    kwargs: dict[str, Any] = {"metadata": {META: meta}}
    if factory is not None:
        kwargs["default_factory"] = factory
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    if kw_only is not None:
        kwargs["kw_only"] = kw_only
    return dataclasses.field(**kwargs)


def meta(f: dataclasses.Field) -> Meta:
    """A field's :class:`Meta` (an empty one for a plain field)."""
    found = f.metadata.get(META)
    return found if isinstance(found, Meta) else Meta()


def aliases_of(cls) -> dict[str, str]:
    """``{alias: field}`` over a dataclass's fields."""
    return {alias: f.name for f in dataclasses.fields(cls) for alias in meta(f).aliases}


def label(cls, name: str) -> str:
    """How errors name a field: with its aliases (``stop (max_iter_to_alter)``)."""
    also = [a for a, target in aliases_of(cls).items() if target == name]
    return f"{name} ({', '.join(also)})" if also else name


def check_value(m: Meta, value, where: str):
    """``value`` (already of the field's type) against the field's range, items, keys, choices and check."""
    if m.choices is not None and value not in m.choices:
        raise OptionError(f"{where} must be {' or '.join(repr(c) for c in m.choices)}, got {value!r}")
    if m.range is not None and _is_number(value) and not m.range.holds(value):
        raise OptionError(f"{where} must be {m.range.text()}, got {value}")
    if m.items is not None and isinstance(value, (tuple, list, dict)):
        entries = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in entries:
            if _is_number(item) and not m.items.holds(item):
                raise OptionError(f"{where}[{key}] must be {m.items.text()}, got {item}")
    if m.keys is not None and isinstance(value, dict):
        for key in value:
            if not _is_number(key) or not m.keys.holds(key):
                raise OptionError(f"{where} keys must be {m.keys.text()}, got {key!r}")
    if m.check is not None:
        value = m.check(value, where)
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
