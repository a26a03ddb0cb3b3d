"""One source for every method option: the controls' dataclass fields, read by the Python API, the CLI (``--set
method.field=value``, ``attncontrol methods``), batch files (``options``) and the app (its accordions).

:func:`method_fields` lists a method's fields with their types, defaults, help and ranges (from the fields'
metadata, see :mod:`attncontrol.controls.fields`); :func:`coerce` checks a value against a field's type (strictly
for Python values, parsing text from the command line and the app); :func:`build_controls` is the one validator
that turns method names, options, subjects and boxes into controls, every error an
:class:`~attncontrol.errors.OptionError` that names the bad value and where it came from. A new method's options
appear in every front end by being fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from ..errors import AttnControlError, OptionError, OptionTypeError
from .fields import Meta, check_value, label, meta

# fields given otherwise (--subjects, --boxes, --region), not as options
NOT_OPTIONS = {"subjects", "boxes", "regions"}


@dataclass(frozen=True)
class FieldSpec:
    method: str
    name: str
    type: Any
    type_text: str
    default: Any
    help: str
    aliases: tuple[str, ...] = ()
    meta: Meta = Meta()

    @property
    def scalar(self) -> str | None:
        """ "int", "float", "bool" or "str" for single-valued fields (what the app shows as a plain input)."""
        arms = [a for a in _arms(self.type) if a is not type(None)]
        if len(arms) == 1 and arms[0] in (int, float, bool, str):
            return arms[0].__name__
        return None

    def range_text(self) -> str:
        """The range and unit in words, for help and tables (e.g. ">= 0 steps", "one of 'all', 'text'")."""
        m = self.meta
        parts = []
        if m.choices:
            parts.append("one of " + ", ".join(repr(c) for c in m.choices))
        if m.range is not None:
            parts.append(m.range.text())
        if m.keys is not None:
            parts.append(f"keys {m.keys.text()}")
        if m.items is not None:
            parts.append(f"{'values' if m.keys is not None else 'each'} {m.items.text()}")
        text = ", ".join(parts)
        return f"{text} ({m.unit})" if text and m.unit else text or (m.unit or "")


def _arms(tp) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def method_fields(cls) -> list[FieldSpec]:
    """Every option of a method's dataclass, in declaration order, with what its field's metadata says (help,
    range, unit, published aliases); ``subjects`` and ``boxes``, given otherwise, are left out."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        m = meta(f)
        if not m.option or f.name in NOT_OPTIONS:
            continue
        factory = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory() if callable(factory) else None
        text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        specs.append(FieldSpec(cls.method, f.name, hints[f.name], text, default, m.help, m.aliases, m))
    return specs


def _bad(where: str, value, expected: str) -> OptionTypeError:
    return OptionTypeError(f"{where} must be {expected}, got {value!r} ({type(value).__name__})")


def _number(value, tp, where: str, text: bool):
    if isinstance(value, str) and text:
        s = value.strip()
        try:
            value = int(s) if tp is int and re.fullmatch(r"[+-]?\d+", s) else float(s) if tp is float else None
        except ValueError:
            value = None
        if value is None:
            raise _bad(where, s, "an integer" if tp is int else "a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
        raise _bad(where, value, "an integer" if tp is int else "a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond any float
        finite = False
    if not finite:
        shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}... ({len(str(value))} digits)"
        raise OptionError(f"{where} must be a finite number, got {shown}")
    return float(value) if tp is float else value


def _text_parts(value: str) -> Any:
    s = value.strip()
    if s[:1] in "[{(":
        try:
            return json.loads(s.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            raise OptionTypeError(f'cannot read {value!r}: expected JSON, e.g. [1, 0.5] or {{"0": 0.5}}') from None
    return [p.strip() for p in s.split(",") if p.strip()]


def coerce(value, tp, where: str, text: bool = False):
    """``value`` as a value of type ``tp``; ``text=True`` also parses strings (command line, app, JSON files).
    Raises :class:`OptionTypeError` / :class:`OptionError` naming ``where`` and the value."""
    arms = _arms(tp)
    if len(arms) > 1:
        return _coerce_union(value, arms, where, text)
    origin = typing.get_origin(tp)
    if tp is bool:
        if text and isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise _bad(where, value, "true or false")
        return value
    if tp in (int, float):
        return _number(value, tp, where, text)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(where, value, "a string")
        return value
    if origin is tuple or tp is tuple:
        return _coerce_tuple(value, typing.get_args(tp), where, text)
    if origin is dict or tp is dict:
        return _coerce_dict(value, typing.get_args(tp), where, text)
    if (origin is list or tp is list) and not isinstance(value, (list, tuple, str, int)):
        raise _bad(where, value, "a list")
    return value


def _coerce_union(value, arms: tuple, where: str, text: bool):
    """The first arm of ``X | Y | None`` that takes ``value``; None (or empty text) for an optional field."""
    empty = value is None or (text and isinstance(value, str) and value.strip().lower() in ("none", "null", ""))
    if empty and type(None) in arms:
        return None
    for arm in arms:
        if arm is type(None):
            continue
        try:
            return coerce(value, arm, where, text)
        except OptionError:
            continue
    names = " or ".join("None" if a is type(None) else getattr(a, "__name__", str(a)) for a in arms)
    raise _bad(where, value, names) from None


def _coerce_tuple(value, args: tuple, where: str, text: bool) -> tuple:
    """``tuple[X, ...]`` or ``tuple[X, Y]`` (text: comma-separated or JSON)."""
    if text and isinstance(value, str):
        value = _text_parts(value)
    if not isinstance(value, (list, tuple)):
        raise _bad(where, value, "a sequence")
    if not args:
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{where}[{k}]", text) for k, v in enumerate(value))
    if len(value) != len(args):
        raise OptionTypeError(f"{where} must have {len(args)} values, got {value!r}")
    return tuple(coerce(v, a, f"{where}[{k}]", text) for k, (v, a) in enumerate(zip(value, args)))


def _coerce_dict(value, args: tuple, where: str, text: bool) -> dict:
    """``dict[K, V]`` (text: ``KEY:VALUE`` pairs or a JSON object); keys are parsed as text."""
    if text and isinstance(value, str):
        s = value.strip()
        parts = [] if s in ("", "{}") or s.startswith("{") else _text_parts(s)
        if not isinstance(parts, list) or any(not isinstance(p, str) or ":" not in p for p in parts):
            raise OptionTypeError(
                f"{where} must be KEY:VALUE pairs (e.g. 0:0.05,10:0.5) or a JSON object, got {value!r}"
            )
        pairs = dict(p.split(":", 1) for p in parts)
        value = {} if s in ("", "{}") else _text_parts(s) if s.startswith("{") else pairs
    if not isinstance(value, dict):
        raise _bad(where, value, "a mapping")
    if not args:
        return dict(value)
    return {
        coerce(k, args[0], f"{where} key", True): coerce(v, args[1], f"{where}[{k}]", text) for k, v in value.items()
    }


def check_fields(obj) -> None:
    """Check (and normalise: lists to tuples, int keys) every field of a control dataclass in place: its type,
    then what its metadata says (range, items, keys, choices, its own check). Errors name the field and its
    aliases (``stop (max_iter_to_alter) must be >= 0, got -1``), a type error its class too (the front ends add
    the method's key and where the value came from)."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(obj):
        name = label(cls, f.name)
        value = coerce(getattr(obj, f.name), hints[f.name], f"{cls.__name__}.{name}")
        setattr(obj, f.name, check_value(meta(f), value, name))


def method_key(name: str) -> str:
    """A method's registry key from a name as a user types it: case, ``-`` and ``_`` alike
    (``attend_excite``, ``Attend-Excite`` -> ``attend-excite``)."""
    return str(name).strip().lower().replace("_", "-")


def field_key(name: str) -> str:
    """A field's name from a name as a user types it: ``-`` and ``_`` alike (``scale-factor`` -> ``scale_factor``)."""
    return str(name).strip().replace("-", "_")


def parse_methods(text, methods, where: str = "--methods", error=OptionError) -> list[str]:
    """``"attend-excite,refocus"`` (``+`` joins too; ``_`` for ``-``) -> registry keys, each known and given once;
    ``"none"`` alone -> []. Raises ``error`` naming ``where`` and the bad text."""
    raw = str(text or "")
    parts = [p.strip() for p in raw.replace("+", ",").split(",")]
    names = [method_key(p) for p in parts if p]
    choose = f"choose from none, {', '.join(methods)}"
    if not names:
        raise error(f"{where}: no method named in {raw!r}; {choose}")
    if "none" in names:
        if names == ["none"]:
            return []
        raise error(f"{where}: 'none' (no control) cannot be combined with other methods, got {raw!r}")
    unknown = [p for p, n in zip([p for p in parts if p], names) if n not in methods]
    if unknown:
        raise error(f"{where}: unknown method(s) {unknown}; {choose}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise error(f"{where}: each method may be given once, got {', '.join(repeated)} more than once")
    return names


def parse_option(text: str) -> tuple[str, str, str]:
    """``"astar.scale_factor=5"`` -> ("astar", "scale_factor", "5"); ``-`` and ``_`` alike in both names."""
    key, sep, value = text.partition("=")
    method, dot, name = key.strip().partition(".")
    if not sep or not dot or not method or not name:
        raise OptionError(f"--set takes METHOD.FIELD=VALUE (e.g. astar.scale_factor=5), got {text!r}")
    return method_key(method), field_key(name), value


def takes_boxes(cls) -> bool:
    """Whether a method is driven by boxes (Refocus, BoxDiff) rather than by subjects."""
    return "boxes" in {f.name for f in dataclasses.fields(cls)}


def takes_regions(cls) -> bool:
    """Whether a method is driven by regions, (sub-prompt, box) pairs (Regions), rather than by subjects."""
    return "regions" in {f.name for f in dataclasses.fields(cls)}


def option_value(methods: dict, method: str, name: str, value, where: str, text: bool = True):
    """A single option checked against its method's field: (canonical field name, value). Method and field names
    may use ``-`` or ``_``."""
    method, name = method_key(method), field_key(name)
    if method not in methods:
        raise OptionError(f"{where}: unknown method {method!r}; choose from {', '.join(methods)}")
    cls = methods[method]
    name = getattr(cls, "aliases", {}).get(name, name)
    specs = {s.name: s for s in method_fields(cls)}
    if name not in specs:
        raise OptionError(
            f"{where}: {method} has no option {name!r}; its options: {', '.join(specs)} "
            f"(`attncontrol methods` lists them)"
        )
    return name, coerce(value, specs[name].type, f"{where}: {method}.{name}", text)


def build_controls(
    methods: dict,
    names: list[str],
    subjects: list | None,
    boxes: dict | None,
    options: dict[str, dict[str, Any]] | None = None,
    sources: dict[tuple[str, str], str] | None = None,
    where: str = "",
    subjects_from: str = "subjects",
    boxes_from: str = "boxes",
    regions: list | None = None,
    regions_from: str = "regions",
) -> list:
    """The one validator: controls for ``names`` with ``options`` (already checked per field, see
    :func:`option_value`), ``subjects``, ``boxes`` and ``regions``. ``sources[(method, field)]`` says where an
    option came from (a flag, a file line, an app field), so a dataclass check failing on it names that source."""
    prefix = f"{where}: " if where else ""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise OptionError(f"{prefix}each method may be given once, got {', '.join(repeated)} more than once")
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise OptionError(f"{prefix}unknown method(s) {unknown}; choose from {', '.join(methods)}")
    options, sources = options or {}, sources or {}
    stray = sorted(set(options) - set(names))
    if stray:
        raise OptionError(f"{prefix}options for {', '.join(stray)}, which is not among the methods {', '.join(names)}")
    boxed = [n for n in names if takes_boxes(methods[n])]
    if boxes and not boxed:
        users = ", ".join(n for n, cls in methods.items() if takes_boxes(cls))
        raise OptionError(f"{prefix}{boxes_from} are for {users}; none is among the methods {', '.join(names)}")
    for n in boxed:
        if not boxes:
            raise OptionError(f"{prefix}{n} needs {boxes_from}, e.g. 'cat=0.05,0.2,0.5,0.9;dog=0.55,0.2,0.95,0.9'")
    regional = _check_regions(methods, names, regions, prefix, regions_from)
    needing = [n for n in names if n not in boxed and n not in regional]
    if needing and not subjects:
        raise OptionError(f"{prefix}{subjects_from} are required for {', '.join(needing)}")
    controls = []
    for n in names:
        kwargs = dict(options.get(n, {}))
        given = {"boxes": boxes} if n in boxed else {"regions": regions} if n in regional else None
        kwargs.update(given or {"subjects": list(subjects or [])})
        try:
            controls.append(methods[n](**kwargs))
        except (ValueError, TypeError) as err:
            if isinstance(err, AttnControlError) and not isinstance(err, OptionError):
                raise  # a subject or resolution error says what it needs to
            source = _source_of(str(err), n, kwargs, sources) or where
            kind = OptionTypeError if isinstance(err, TypeError) else OptionError
            raise kind(f"{source + ': ' if source else ''}{n}: {err}") from None
    return controls


def _check_regions(methods: dict, names: list[str], regions, prefix: str, regions_from: str) -> list[str]:
    """The methods among ``names`` that take regions: regions are given exactly when one is there."""
    regional = [n for n in names if takes_regions(methods[n])]
    if regions and not regional:
        users = ", ".join(n for n, cls in methods.items() if takes_regions(cls))
        raise OptionError(
            f"{prefix}{regions_from} is for the {users} method, which is not among the methods "
            f"{', '.join(names) or 'none'}"
        )
    for n in regional:
        if not regions:
            raise OptionError(f"{prefix}{n} needs {regions_from}, e.g. 'a red car@0.1,0.1,0.5,0.9'")
    return regional


def _source_of(message: str, method: str, kwargs: dict, sources: dict) -> str | None:
    for name in kwargs:
        if re.search(rf"\b{re.escape(name)}\b", message) and (method, name) in sources:
            return sources[(method, name)]
    return None


def show_value(value):
    """A default as the command line and JSON write it (tuples as lists, dict keys as text)."""
    if isinstance(value, tuple):
        return [show_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): show_value(v) for k, v in value.items()}
    return value


def own_fields(cls) -> set[str]:
    """The fields a method's class declares or overrides (not those it inherits unchanged from its base)."""
    base = {f.name: f for f in dataclasses.fields(cls.__mro__[1])} if dataclasses.is_dataclass(cls.__mro__[1]) else {}
    return {f.name for f in dataclasses.fields(cls) if base.get(f.name) is not f}


def options_table(cls, names: set[str] | None = None) -> str:
    """A method's options (or those in ``names``) as a Markdown table (option, default, range, meaning), from its
    fields' metadata."""
    rows = ["| option | default | range | meaning |", "|---|---|---|---|"]
    for spec in method_fields(cls):
        if names is not None and spec.name not in names:
            continue
        name = f"`{spec.name}`" + "".join(f" (`{a}`)" for a in spec.aliases)
        default = f"`{json.dumps(show_value(spec.default))}`"
        meaning = spec.help.replace("|", "\\|")
        rows.append(f"| {name} | {default} | {spec.range_text()} | {meaning} |")
    return "\n".join(rows)


def options_markdown(methods: dict, shared: type) -> str:
    """Every method's options as the README shows them (``attncontrol methods --markdown``): the options the
    map-reading methods share (the fields of ``shared``, their common base), then each method's own (its class's
    fields)."""
    parts = [
        "Shared by every method that reads maps and moves the latents (all but `regulate`, which has `start`, "
        "`stop` and its own options below):",
        "",
        options_table(shared),
    ]
    for key, cls in methods.items():
        parts += ["", f"`{key}` ({cls.__name__}):", "", options_table(cls, own_fields(cls))]
    return "\n".join(parts)
