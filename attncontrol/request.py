"""One request, whatever the front end: the command line, a batch line, the app and Python all turn what a user
gave (methods, per-method options, subjects, boxes, regions, pipeline arguments) into a :class:`ControlRequest` through
:func:`build_request`, so every value meets the same checks and every error names where the value came from
(``--set astar.scale_factor=abc``, ``prompts.jsonl:3: options.refocus.tiered``, ``the field 'astar · lr'``).
Torch-free: the command line validates a request before it loads a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .controls import METHODS
from .controls.boxes import parse_boxes, region_list
from .controls.options import build_controls, method_key, option_value, parse_methods
from .errors import OptionError, OptionTypeError
from .limits import SEED_RANGE, check_image_size
from .tokens import check_text


@dataclass(frozen=True)
class ControlRequest:
    """A validated request: the methods (registry keys, in the order given), each method's options (canonical
    field names, checked values), the subjects, the boxes, the controls built from them, where each option came
    from, the pipeline arguments as given (checked by :func:`attncontrol.generate`) and the regions (checked
    ``(sub-prompt, [box, ...])`` pairs, in order)."""

    methods: tuple[str, ...]
    options: dict[str, dict[str, Any]]
    subjects: list | None
    boxes: dict | None
    controls: list
    sources: dict[tuple[str, str], str] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    regions: list | None = None


def check_pipeline(values: dict[str, Any], names: dict[str, str] | None = None) -> dict[str, Any]:
    """The pipeline arguments that need no model, checked: ``prompt`` and ``negative_prompt`` (valid text, or a
    list of texts), ``num_inference_steps`` (an int >= 1), ``guidance_scale`` (a finite number or None),
    ``height`` and ``width`` (ints >= 1 or None, within :mod:`attncontrol.limits`) and ``seed`` (in a torch
    generator's range or None). ``names`` says how the front end calls each (``--steps``); the model's own rules
    (a multiple of its VAE's factor, its scheduler's timesteps) are checked when it is loaded."""
    name = {key: key for key in values} | dict(names or {})
    for key in ("prompt", "negative_prompt"):
        value = values.get(key)
        for text in [value] if isinstance(value, str) else value or []:
            if not isinstance(text, str):
                raise OptionTypeError(f"{name[key]} must be text or a list of texts, got {text!r}")
            check_text(text, name[key])
    steps = values.get("num_inference_steps")
    if "num_inference_steps" in values and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise OptionError(f"{name['num_inference_steps']} must be an int >= 1, got {steps!r}")
    guidance = values.get("guidance_scale")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise OptionTypeError(f"{name['guidance_scale']} must be a number, got {guidance!r}")
        if guidance != guidance or guidance in (float("inf"), float("-inf")):
            raise OptionError(f"{name['guidance_scale']} must be a finite number, got {guidance}")
    for key in ("height", "width"):
        side = values.get(key)
        if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
            raise OptionError(f"{name[key]} must be a positive multiple of 8, got {side!r}")
    check_image_size(
        values.get("height"), values.get("width"), (name.get("height", "height"), name.get("width", "width"))
    )
    seed = values.get("seed")
    if seed is not None:
        lo, hi = SEED_RANGE
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise OptionError(f"{name['seed']} must be an integer between {lo} and {hi}, got {seed!r}")
        if not lo <= seed <= hi:
            raise OptionError(f"{name['seed']} must be between {lo} and {hi} (a torch generator's range), got {seed}")
    return dict(values)


def method_list(methods: str | Sequence[str] | None, where: str = "methods") -> list[str]:
    """Registry keys from ``"attend-excite,refocus"`` (or ``+``; ``_`` for ``-``; ``"none"`` alone: []) or from a
    list of such names: each known and given once."""
    if methods is None or isinstance(methods, str):
        return parse_methods(methods, METHODS, where)
    if not all(isinstance(m, str) for m in methods):
        raise OptionError(f"{where} must be a list of method names ({', '.join(METHODS)}), got {list(methods)!r}")
    if not methods:
        return []
    return parse_methods(",".join(methods), METHODS, where)


def checked_options(
    names: list[str],
    options: dict | None,
    text: bool,
    sources: dict[tuple[str, str], str] | None = None,
    where: str = "options",
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    """``{method: {field: value}}`` (method and field names with ``-`` or ``_``, published aliases too), each value
    checked against its field (``text``: parsed from text): (options by canonical names, source of each).
    ``sources[(method, field)]`` names where a value came from; otherwise ``where``."""
    out: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}
    for method, fields in (options or {}).items():
        if not isinstance(fields, dict):
            raise OptionError(f"{where}.{method} must map fields to values, got {fields!r}")
        for name, value in fields.items():
            source = (sources or {}).get((method, name)) or where
            canonical, checked = option_value(METHODS, method, name, value, source, text)
            key = method_key(method)  # known: option_value checked it
            if key not in names:
                raise OptionError(f"{source}: {key} is not among the methods {', '.join(names) or 'none'}")
            if (key, canonical) in origin:
                raise OptionError(
                    f"{source} sets {key}.{canonical}, which {origin[(key, canonical)]} already sets; give it once"
                )
            out.setdefault(key, {})[canonical] = checked
            origin[(key, canonical)] = source
    return out, origin


def build_request(
    methods: str | Sequence[str] | None,
    subjects: Sequence | None = None,
    boxes: dict | str | None = None,
    options: dict | None = None,
    *,
    text: bool = False,
    sources: dict[tuple[str, str], str] | None = None,
    where: str = "",
    methods_from: str = "methods",
    subjects_from: str = "subjects",
    boxes_from: str = "boxes",
    options_from: str = "options",
    pipeline: dict[str, Any] | None = None,
    pipeline_from: dict[str, str] | None = None,
    regions: Sequence | str | None = None,
    regions_from: str = "regions",
) -> ControlRequest:
    """The one way in: methods (text or a list), subjects, boxes (a dict or ``"cat=x0,y0,x1,y1;dog=..."``),
    regions (``[("a red car", (x0, y0, x1, y1)), ...]``, ``"a red car@x0,y0,x1,y1|a dog@..."`` or a list of such
    texts: the ``regions`` method's regions, which they select when ``methods`` is None) and per-method options,
    checked and built into controls. ``text``: option values are text (command line, app, files); ``sources``
    says where each (method, field) came from, ``*_from`` how the front end names its inputs, ``where`` the
    request's own source (a file line), prefixed to every error; ``pipeline`` the pipeline arguments
    (:func:`check_pipeline`), ``pipeline_from`` their names in the front end. Raises
    :class:`~attncontrol.errors.OptionError` (:class:`~attncontrol.errors.OptionTypeError` for a wrong type)."""
    prefix = f"{where}: " if where else ""
    given = {key: f"{prefix}{(pipeline_from or {}).get(key, key)}" for key in pipeline or {}}
    checked_pipeline = check_pipeline(dict(pipeline or {}), given)
    given_regions = _regions(regions, f"{prefix}{regions_from}")
    if methods is None and given_regions:  # regions name their method, as --boxes names refocus
        methods = ["regions"]
    names = method_list(methods, f"{prefix}{methods_from}")
    if isinstance(boxes, str):
        try:
            boxes = parse_boxes(boxes) if boxes.strip() else None
        except ValueError as err:
            raise OptionError(f"{prefix}{boxes_from}: {err}") from None
    checked, origin = checked_options(names, options, text, sources, f"{prefix}{options_from}")
    controls = build_controls(
        METHODS,
        names,
        list(subjects) if subjects else None,
        boxes,
        checked,
        origin,
        where=where,
        subjects_from=subjects_from,
        boxes_from=boxes_from,
        regions=given_regions,
        regions_from=regions_from,
    )
    subject_list = list(subjects) if subjects else None
    return ControlRequest(tuple(names), checked, subject_list, boxes, controls, origin, checked_pipeline, given_regions)


def _regions(regions, where: str) -> list | None:
    """The regions checked (:func:`~attncontrol.controls.boxes.region_list`), or None for none (None, an empty
    text or list)."""
    empty = regions is None or (regions.strip() == "" if isinstance(regions, str) else regions in ([], ()))
    return None if empty else region_list(regions, where)
