"""What the Gradio app does, without Gradio: request validation, the token table, box drawing, and a
:class:`Runner` that makes the baseline and the controlled image (same seed) with their attention maps.

``app.py`` holds only the layout and turns :class:`DemoError` into ``gr.Error``; everything here is plain Python
and unit-tested. Method parameters come from the controls' dataclasses (:func:`method_params`), so a new method
appears in the app with its defaults by being added to ``attncontrol.controls.METHODS``; every value a user types
is checked by the same validator as the command line's and bounded (the fields' ``app`` bounds).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..controls import METHODS, parse_boxes
from ..controls.boxes import region_list
from ..controls.options import FieldSpec, method_fields, option_value, show_value, takes_boxes, takes_regions
from ..errors import AttnControlError
from ..request import build_request as build_control_request
from ..request import method_list
from ..tokens import check_text

if TYPE_CHECKING:
    from ..attention import AttentionMaps
    from ..run import GenerationResult

# The app's bounds on a number option (a public demo must not be made to run for hours): the field's own ``app``
# bounds where its metadata gives them, else its range within these.
DEFAULT_RANGES = {"int": (0, 100), "float": (-1000.0, 1000.0)}


class DemoError(AttnControlError, ValueError):
    """A user mistake in the app (shown in the page; the app keeps serving)."""


class DemoCancelled(DemoError):
    """The client went away; the run stopped at the end of a step."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (a public demo must not be made to run for hours). ``time_limit`` is
    checked before each of the two runs and at the end of every sampling step: a request stops at most one step
    (that step's guidance and refinement included) after its limit."""

    max_steps: int = 100
    min_side: int = 64
    max_side: int = 1024
    max_subjects: int = 6
    max_boxes: int = 8
    max_prompt_chars: int = 400
    max_guidance: float = 30.0
    time_limit: float = 600.0  # seconds per request (baseline + controlled)


@dataclass(frozen=True)
class Param:
    """One method option shown in the app: a field of the method's dataclass, with its default and bounds."""

    method: str
    name: str
    kind: str  # "int", "float", "bool", "str" (a plain input) or "text" (typed as on the command line)
    default: Any
    spec: FieldSpec | None = None

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    @property
    def bounds(self) -> tuple[float, float] | None:
        """The field's ``app`` bounds (its metadata), else its range within :data:`DEFAULT_RANGES`."""
        if self.kind not in ("int", "float"):
            return None
        lo, hi = DEFAULT_RANGES[self.kind]
        meta = self.spec.meta if self.spec is not None else None
        if meta is not None and meta.app is not None:
            return meta.app
        if meta is not None and meta.range is not None:
            lo = lo if meta.range.low is None else max(lo, meta.range.low)
            hi = hi if meta.range.high is None else min(hi, meta.range.high)
        return lo, hi

    def shown(self) -> Any:
        """The default as the app shows it (a text field gets the command line's form)."""
        if self.kind != "text":
            return self.default
        return "" if self.default is None else json.dumps(show_value(self.default))


def method_params(methods: dict | None = None) -> list[Param]:
    """Every option of every method, in declaration order (the same fields as ``attncontrol methods``)."""
    out = []
    for method, cls in (methods or METHODS).items():
        for spec in method_fields(cls):
            # an optional scalar whose default is None ("the family's default") cannot be a checkbox or a number
            # box without losing that None (an unticked box sends False): it is a text field, empty = default
            kind = spec.scalar if spec.scalar and spec.default is not None else "text"
            out.append(Param(method, spec.name, kind, spec.default, spec))
    return out


def check_param(param: Param, value) -> Any:
    """A value the user gave for ``param``, checked against its field and its bounds; a sentence otherwise."""
    where = f"the field '{param.method} · {param.label}'"
    if value is None or (isinstance(value, str) and not value.strip() and param.kind != "str"):
        if param.kind == "text":
            return param.default
        raise DemoError(f"{where} is empty; give a value (default: {param.default})")
    if isinstance(value, float) and not math.isfinite(value):
        raise DemoError(f"{where} must be a finite number, got {value}")
    if param.kind == "int" and isinstance(value, float):
        if not value.is_integer():  # 3.4 is not rounded to 3: the user meant something else
            raise DemoError(f"{where} must be a whole number, got {value}")
        value = int(value)
    if param.kind in ("text", "str") and isinstance(value, str):
        _text(value, where)
    try:
        _, checked = option_value(METHODS, param.method, param.name, value, where, text=True)
    except (AttnControlError, ValueError, TypeError, ArithmeticError) as err:  # a value only the API can send
        raise DemoError(str(err)) from None
    bounds = param.bounds
    if bounds and isinstance(checked, (int, float)) and not bounds[0] <= checked <= bounds[1]:
        raise DemoError(f"{where} must be between {bounds[0]} and {bounds[1]} in this app, got {checked}")
    return checked


def _text(value, where: str) -> str:
    """A text input as the app's fields send it (the API can send anything): a str of valid text, or DemoError."""
    if not isinstance(value, str):
        raise DemoError(f"{where} must be text, got {value!r}")
    try:
        return check_text(value, where)
    except AttnControlError as err:
        raise DemoError(str(err)) from None


def _whole(label: str, value, lo: int, hi: int) -> int:
    """A whole number as a number field sends it (3 or 3.0), within ``lo..hi``; 3.4, "3", True are refused."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer()))
    ):
        raise DemoError(f"{label} must be a whole number, got {value!r}")
    number = int(value)
    if not lo <= number <= hi:
        raise DemoError(f"{label} must be between {lo} and {hi}, got {number}")
    return number


def token_rows(tokenizer, prompt: str) -> list[list]:
    """``[index, token, word]`` for the prompt's tokens (start/end of text included), for the token table."""
    from ..tokens import tokenize

    if not isinstance(prompt, str) or not prompt.strip():
        return []
    table = tokenize(tokenizer, prompt)
    return [[r.index, r.text, r.word] for r in table.rows() if r.index <= table.eot_index]


def word_choices(tokenizer, prompt: str) -> list[str]:
    """The prompt's distinct words, in order: what the user can tick as subjects."""
    seen: dict[str, None] = {}
    for _, _, word in token_rows(tokenizer, prompt):
        if word and re.search(r"\w", word):
            seen.setdefault(word, None)
    return list(seen)


def prompt_update(tokenizer, prompt, picked) -> tuple[list[list], list[str], list[str]]:
    """What a prompt change shows: the token table, the words to tick, and the ticked words still in the prompt.
    Any input (the API can send anything) gives a table, empty where the prompt cannot be read."""
    try:
        rows, words = token_rows(tokenizer, prompt), word_choices(tokenizer, prompt)
    except (ValueError, TypeError):  # not valid text, a prompt the tokenizer cannot place
        rows, words = [], []
    kept = [w for w in picked if w in words] if isinstance(picked, list) else []
    return rows, words, kept


def parse_subjects(picked, typed: str | None) -> list:
    """Ticked words plus typed ones (``"red car, cat#2, 5"``; digits are token indices), without repeats."""
    if picked is not None and (not isinstance(picked, list) or not all(isinstance(p, str) for p in picked)):
        raise DemoError(f"the ticked subjects must be a list of words, got {picked!r}")
    if typed is not None:
        _text(typed, "the typed subjects")
    for word in picked or []:
        _text(word, "a ticked subject")
    subjects: list = []
    for s in list(picked or []) + [t.strip() for t in re.split(r"[,;]", typed or "") if t.strip()]:
        value = int(s) if isinstance(s, str) and s.isdigit() else s
        if value not in subjects:
            subjects.append(value)
    return subjects


@dataclass
class Request:
    prompt: str
    subjects: list
    methods: list[str]
    boxes: dict | None
    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    controls: list = field(default_factory=list)  # built by build_request from the fields above
    regions: list | None = None  # the regions method's (sub-prompt, [box, ...]) pairs, checked

    @property
    def observed(self) -> list:
        """Whose attention to show: the subjects, or the boxes' subjects for Refocus alone (none for regions
        alone without subjects: the run then records no maps)."""
        return list(self.subjects) or list(self.boxes or {})


def build_request(
    prompt: str,
    subjects: list,
    methods: list[str],
    boxes_text: str | None,
    seed,
    steps,
    guidance_scale,
    height,
    width,
    params: dict[tuple[str, str], Any] | None = None,
    limits: Limits = Limits(),
    regions_text: str | None = None,
) -> Request:
    """Validate everything a user typed (and whatever a client of the API sends: every field is checked for its
    type too); raise :class:`DemoError` naming the bad value. ``regions_text``: one region a line,
    ``a red car@x0,y0,x1,y1``."""
    prompt = _checked_prompt(prompt, limits)
    _check_input_types(subjects, methods, boxes_text, params)
    methods = _checked_methods(methods, subjects, limits)
    regions = _checked_regions(regions_text, methods, limits)
    boxes = _checked_boxes(boxes_text, methods, subjects, limits)
    ints, guidance = _checked_numbers(steps, height, width, seed, guidance_scale, limits)
    options = _checked_options(methods, params)
    # the one request builder, as for the command line and batch files (ranges, boxes in [0, 1])
    sources = {(m, n): f"the field '{m} · {n.replace('_', ' ')}'" for m, fields in options.items() for n in fields}
    try:
        pipeline = {"prompt": prompt, "num_inference_steps": ints["steps"], "guidance_scale": guidance}
        pipeline.update(height=ints["height"], width=ints["width"], seed=ints["seed"])
        names = {"num_inference_steps": "steps", "guidance_scale": "guidance scale"}
        request = build_control_request(
            methods, subjects, boxes, options, sources=sources, pipeline=pipeline, pipeline_from=names, regions=regions
        )
        controls = request.controls
    except (ValueError, TypeError) as err:
        raise DemoError(str(err)) from None
    return Request(
        prompt,
        subjects,
        methods,
        boxes,
        ints["seed"],
        ints["steps"],
        guidance,
        ints["height"],
        ints["width"],
        options,
        controls,
        regions,
    )


def _checked_prompt(prompt, limits: Limits) -> str:
    """The prompt, stripped: valid text, not empty, not longer than the limit."""
    prompt = _text(prompt if prompt is not None else "", "the prompt").strip()
    if not prompt:
        raise DemoError("type a prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise DemoError(f"the prompt has {len(prompt)} characters; at most {limits.max_prompt_chars}")
    return prompt


def _check_input_types(subjects, methods, boxes_text, params) -> None:
    """The types of the request's lists and texts (what the page sends, whatever an API client sends)."""
    if not isinstance(subjects, list) or not all(
        isinstance(s, (str, int)) and not isinstance(s, bool) for s in subjects
    ):
        raise DemoError(f"subjects must be a list of words or token indices, got {subjects!r}")
    if methods is not None and (not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)):
        raise DemoError(f"methods must be a list of method names ({', '.join(METHODS)}), got {methods!r}")
    if boxes_text is not None:
        _text(boxes_text, "boxes")
    if params is not None and not isinstance(params, dict):
        raise DemoError(f"the method parameters must be a mapping, got {params!r}")


def _checked_methods(methods: list[str] | None, subjects: list, limits: Limits) -> list[str]:
    """The methods (at least one, each known), and no more subjects than the limit."""
    try:  # the one parser of method names (unknown ones, repeats)
        methods = method_list(list(methods or []), "methods")
    except AttnControlError as err:
        raise DemoError(str(err)) from None
    if not methods:
        raise DemoError(f"pick at least one method ({', '.join(METHODS)})")
    if len(subjects) > limits.max_subjects:
        raise DemoError(f"{len(subjects)} subjects; at most {limits.max_subjects}")
    return methods


def _checked_boxes(boxes_text: str | None, methods: list[str], subjects: list, limits: Limits) -> dict | None:
    """The parsed boxes (None without any): given exactly when a method takes boxes; and subjects for every
    method that does not."""
    boxes = None
    boxed = [m for m in methods if takes_boxes(METHODS[m])]
    if boxes_text and boxes_text.strip():
        if not boxed:
            users = " or ".join(m for m, cls in METHODS.items() if takes_boxes(cls))
            raise DemoError(f"boxes are used by {users}: tick one, or clear the boxes")
        try:
            boxes = parse_boxes(boxes_text)
        except ValueError as err:
            raise DemoError(f"boxes: {err}") from None
        if sum(len(b) for b in boxes.values()) > limits.max_boxes:
            raise DemoError(f"at most {limits.max_boxes} boxes")
    elif boxed:
        raise DemoError(f"{' and '.join(boxed)} needs boxes, e.g. 'cat=0.05,0.2,0.5,0.9; dog=0.55,0.2,0.95,0.9'")
    needing = [m for m in methods if m not in boxed and not takes_regions(METHODS[m])]
    if needing and not subjects:
        raise DemoError(f"pick the subjects for {', '.join(needing)} (tick or type them)")
    return boxes


def _checked_regions(regions_text, methods: list[str], limits: Limits) -> list | None:
    """The parsed regions, one ``a red car@x0,y0,x1,y1`` a line (None without any): given exactly when a method
    takes regions; each error names the bad region."""
    if regions_text is not None:
        _text(regions_text, "regions")
    lines = [line.strip() for line in (regions_text or "").splitlines() if line.strip()]
    regional = [m for m in methods if takes_regions(METHODS[m])]
    if not lines:
        if regional:
            raise DemoError(f"{' and '.join(regional)} needs regions, one a line: 'a red car@0.1,0.1,0.5,0.9'")
        return None
    if not regional:
        users = " or ".join(m for m, cls in METHODS.items() if takes_regions(cls))
        raise DemoError(f"regions are used by the {users} method: tick it, or clear the regions")
    try:
        regions = region_list(lines, "regions")
    except ValueError as err:
        raise DemoError(str(err)) from None
    if len(regions) > limits.max_boxes:
        raise DemoError(f"{len(regions)} regions; at most {limits.max_boxes}")
    return regions


def _checked_numbers(steps, height, width, seed, guidance_scale, limits: Limits) -> tuple[dict[str, int], float]:
    """The whole numbers (steps, height, width, seed: by name) within the limits, the sides multiples of 8; and
    the guidance scale."""
    ints = {}
    for label, value, lo, hi in (
        ("steps", steps, 1, limits.max_steps),
        ("height", height, limits.min_side, limits.max_side),
        ("width", width, limits.min_side, limits.max_side),
        ("seed", seed, 0, 2**32 - 1),
    ):
        ints[label] = _whole(label, value, lo, hi)
    for label in ("height", "width"):
        if ints[label] % 8:
            raise DemoError(f"{label} must be a multiple of 8, got {ints[label]}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise DemoError(f"guidance scale must be a number, got {guidance_scale!r}")
    guidance = float(guidance_scale)
    if not 0 <= guidance <= limits.max_guidance:
        raise DemoError(f"guidance scale must be between 0 and {limits.max_guidance}, got {guidance}")
    return ints, guidance


def _checked_options(methods: list[str], params: dict | None) -> dict[str, dict[str, Any]]:
    """Per chosen method, the parameters the user changed from their defaults, each checked (the parameters of
    methods not chosen, and unknown fields, are ignored)."""
    options: dict[str, dict[str, Any]] = {m: {} for m in methods}
    by_key = {(p.method, p.name): p for p in method_params()}
    for key, value in (params or {}).items():
        if not isinstance(key, tuple) or len(key) != 2:
            raise DemoError(f"a method parameter must be keyed by (method, field), got {key!r}")
        method, name = key
        if method in options and (method, name) in by_key:
            checked = check_param(by_key[(method, name)], value)
            if checked != by_key[(method, name)].default:
                options[method][name] = checked
    return options


def canvas_size(height, width, default: tuple[int, int], limits: Limits = Limits()) -> tuple[int, int]:
    """(width, height) of the box canvas: the size fields when they hold a size the app allows, else the model's
    native size (a canvas is never made from a size the API sent unchecked)."""
    sides = []
    for value, fallback in ((width, default[1]), (height, default[0])):
        try:
            sides.append(_whole("size", value, limits.min_side, limits.max_side))
        except DemoError:
            sides.append(int(fallback))
    return sides[0], sides[1]


def boxes_canvas(text, height, width, default: tuple[int, int], limits: Limits = Limits(), regions_text=None):
    """The canvas with the boxes of ``text`` and the regions of ``regions_text`` drawn (each left out while its
    text is not valid)."""
    try:
        boxes = parse_boxes(text) if isinstance(text, str) and text.strip() and check_text(text) else {}
    except (ValueError, TypeError):
        boxes = {}
    return draw_boxes({**boxes, **_drawn_regions(regions_text)}, canvas_size(height, width, default, limits))


def _drawn_regions(regions_text) -> dict:
    """``{"sub-prompt": [box, ...]}`` of the valid lines of a regions text, to draw (bad lines are left out)."""
    drawn: dict = {}
    lines = regions_text.splitlines() if isinstance(regions_text, str) else []
    for line in filter(str.strip, lines):
        try:
            for text, boxes in region_list([check_text(line)], "regions"):
                drawn.setdefault(f"@ {text}", []).extend(boxes)
        except (ValueError, TypeError):
            continue
    return drawn


def canvas_click(
    pending,
    event,
    subject,
    boxes_text,
    height,
    width,
    default: tuple[int, int],
    limits: Limits = Limits(),
    into: str = "boxes",
):
    """A click on the box canvas (``event``: Gradio's select data, None when the call came without one, e.g.
    through the API): :func:`click_box` at the clicked point, or :func:`click_region` with ``into="regions"``
    (``subject`` is then the region's sub-prompt, ``boxes_text`` the regions text). Returns ``(pending, text)``."""
    point = getattr(event, "index", None)
    if (
        not isinstance(point, (list, tuple))
        or len(point) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point)
    ):
        raise DemoError("click two opposite corners of the box on the canvas (no point came with this click)")
    if pending is not None and not (
        isinstance(pending, (list, tuple)) and len(pending) == 2 and all(isinstance(v, float) for v in pending)
    ):
        pending = None
    if subject is not None and not isinstance(subject, str):
        raise DemoError(f"the subject a box is for must be a word, got {subject!r}")
    if into not in ("boxes", "regions"):
        raise DemoError(f"the canvas draws boxes or regions, got {into!r}")
    if boxes_text is not None:
        _text(boxes_text, into)
    size = canvas_size(height, width, default, limits)
    click = click_region if into == "regions" else click_box
    return click(pending, tuple(point), size, subject, boxes_text)


def draw_boxes(boxes: dict | None, size: tuple[int, int], base=None):
    """The boxes (normalised x0, y0, x1, y1) drawn with their subjects' names, over ``base`` or a blank canvas."""
    from PIL import Image, ImageDraw

    image = base.convert("RGB").copy() if base is not None else Image.new("RGB", size, (238, 238, 238))
    draw = ImageDraw.Draw(image)
    w, h = image.size
    palette = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (211, 54, 130), (181, 137, 0), (42, 161, 152)]
    for k, (subject, boxes_of) in enumerate((boxes or {}).items()):
        color = palette[k % len(palette)]
        for x0, y0, x1, y1 in boxes_of:
            draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=color, width=max(2, w // 128))
            draw.text((x0 * w + 4, y0 * h + 2), str(subject), fill=color)
    return image


def click_box(pending, point, size, subject, boxes_text: str | None):
    """Drawing a box on the canvas: the first click keeps a corner (returned as ``pending``), the second adds
    ``subject=x0,y0,x1,y1`` (normalised, ordered) to the boxes text. Returns ``(pending, boxes_text)``."""
    subject = (subject or "").strip()
    if not subject:
        raise DemoError("choose the subject the box is for, then click two opposite corners")
    if "=" in subject or ";" in subject:
        raise DemoError(f"a subject cannot contain '=' or ';', got {subject!r}")
    corner, box = _clicked(pending, point, size)
    if box is None:
        return corner, boxes_text or ""
    entry = f"{subject}={box}"
    return None, "; ".join(part for part in ((boxes_text or "").strip().rstrip(";").strip(), entry) if part)


def click_region(pending, point, size, text, regions_text: str | None):
    """Drawing a region on the canvas, as :func:`click_box`: the second click adds the line
    ``sub-prompt@x0,y0,x1,y1`` to the regions text. Returns ``(pending, regions_text)``."""
    text = (text or "").strip()
    if not text:
        raise DemoError("type the region's sub-prompt (e.g. 'a red car') in 'Draw a box for', then click two corners")
    if "|" in text or "\n" in text:
        raise DemoError(f"a region's sub-prompt cannot contain '|' or a line break, got {text!r}")
    corner, box = _clicked(pending, point, size)
    if box is None:
        return corner, regions_text or ""
    return None, "\n".join(part for part in ((regions_text or "").strip(), f"{text}@{box}") if part)


def _clicked(pending, point, size) -> tuple[tuple[float, float] | None, str | None]:
    """A click at ``point`` on a canvas of ``size``: the first corner (``(corner, None)``), or with ``pending``
    the box ``"x0,y0,x1,y1"`` the two corners make (``(None, box)``)."""
    (x, y), (w, h) = point, size
    corner = (min(max(x / w, 0.0), 1.0), min(max(y / h, 0.0), 1.0))
    if pending is None:
        return corner, None
    (x0, x1), (y0, y1) = sorted((pending[0], corner[0])), sorted((pending[1], corner[1]))
    if x1 - x0 < 0.02 or y1 - y0 < 0.02:
        raise DemoError("that box is too small: click two opposite corners")
    return None, f"{x0:.3f},{y0:.3f},{x1:.3f},{y1:.3f}"


@dataclass
class DemoResult:
    baseline: Any
    controlled: Any
    heatmaps: list[tuple[Any, str]]
    curves: list[dict]  # rows {step, value, series} for the plot
    summary: str


class Runner:
    """Owns the pipeline (loaded once, by the caller) and makes one comparison at a time."""

    def __init__(self, pipe, model_name: str = "", limits: Limits = Limits()):
        from ..models import get_adapter

        self.pipe = pipe
        self.model_name = model_name
        self.limits = limits
        self.adapter = get_adapter(pipe)  # fails now, not on the first click, for an unsupported pipeline
        self._lock = threading.Lock()  # runs swap the UNet's processors: one at a time on one pipeline
        self.clock = time.monotonic  # what the time limit is measured with

    @property
    def tokenizer(self):
        return self.adapter.tokenizer

    def native_size(self) -> tuple[int, int]:
        return self.adapter.default_size()

    def default_guidance(self) -> float:
        """The family's default guidance scale (Qwen-Image's pipeline has none: its adapter says what to use)."""
        return self.adapter.default_guidance_scale()

    def run(self, req: Request, progress=None, cancel: threading.Event | None = None) -> DemoResult:
        """Baseline then controlled, same seed; ``progress(done, total, what)`` is called after every step. Setting
        ``cancel`` (the client left) stops the run at the end of the current step, the pipeline restored."""
        outputs = self._generate_pair(req, progress, cancel)
        base, ctrl = outputs["baseline"], outputs["controlled"]
        return DemoResult(
            base.images[0], ctrl.images[0], _heatmaps(req, base, ctrl), _curves(base, ctrl), _summary(req, base, ctrl)
        )

    def _generate_pair(self, req: Request, progress, cancel: threading.Event | None) -> dict[str, GenerationResult]:
        """The baseline (no control) and the controlled generation of ``req``, by label, one request at a time on
        the pipeline; each stops at the end of a step once the time limit has passed or ``cancel`` is set."""
        import torch

        from ..pipeline import generate

        total = 2 * req.steps
        controls = req.controls
        device = self.pipe._execution_device
        gen_device = "cpu" if device.type == "mps" else device
        outputs = {}
        with self._lock:
            start = self.clock()

            def check_time(where: str) -> None:
                # the run stops here (the pipeline is restored): before a run, or at the end of a step
                if self.clock() - start > self.limits.time_limit:
                    raise DemoError(
                        f"this request ran past the app's limit of {self.limits.time_limit:g} s ({where});"
                        " use fewer steps, a smaller size or fewer refinement steps"
                    )

            for offset, (label, ctl) in enumerate((("baseline", []), ("controlled", controls))):
                check_time(f"before the {label} image")

                def step_done(pipe, i, t, kwargs, offset=offset, label=label):
                    if cancel is not None and cancel.is_set():
                        raise DemoCancelled("the request was cancelled: its page was closed")
                    check_time(f"at step {i + 1} of the {label} image")
                    if progress is not None:
                        progress(offset * req.steps + i + 1, total, label)
                    return kwargs

                try:
                    outputs[label] = generate(
                        self.pipe,
                        req.prompt,
                        ctl,
                        num_inference_steps=req.steps,
                        guidance_scale=req.guidance_scale,
                        height=req.height,
                        width=req.width,
                        generator=torch.Generator(gen_device).manual_seed(req.seed),
                        attention=req.observed or False,
                        callback_on_step_end=step_done,
                    )
                except DemoError:
                    raise  # cancelled or over the time limit: already the user's sentence, and its class matters
                except (AttnControlError, ValueError, TypeError) as err:
                    raise DemoError(str(err)) from None
        return outputs


def _attention(out: GenerationResult) -> AttentionMaps | None:
    """The attention maps of one of the app's generations: the request's subjects, or the boxes' subjects; None
    for regions alone without subjects (nothing to observe)."""
    return out.attention


def _heatmaps(req: Request, base: GenerationResult, ctrl: GenerationResult) -> list[tuple[Any, str]]:
    """Each subject's heatmap in the baseline then the controlled image, and the boxes and the regions over the
    controlled one."""
    heatmaps = []
    for label, out in (("baseline", base), ("controlled", ctrl)):
        maps = _attention(out)
        if maps is None:
            continue
        for subject in maps.labels[0]:
            heatmaps.append((maps.heatmap(subject), f"{label} · {subject}"))
    image = ctrl.images[0]
    if req.boxes:
        heatmaps.append((draw_boxes(req.boxes, image.size, image), "controlled · boxes"))
    if req.regions:
        drawn: dict = {}
        for text, boxes in req.regions:
            drawn.setdefault(text, []).extend(boxes)
        heatmaps.append((draw_boxes(drawn, image.size, image), "controlled · regions"))
    return heatmaps


def _curves(base: GenerationResult, ctrl: GenerationResult) -> list[dict]:
    """The plot's rows ``{step, value, series}``: the controlled run's losses per guided step, then the weakest
    subject's attention per step of each run (where subjects were observed)."""
    from ..attention import attention_metrics

    curves = []
    for r in ctrl.trace:
        for name, values in r.losses.items():
            curves.append({"step": r.index, "value": float(values[0]), "series": f"{name} loss"})
    for label, out in (("baseline", base), ("controlled", ctrl)):
        attention = _attention(out)
        if attention is None:
            continue
        maps = attention.maps[:, 0]
        for k, step in enumerate(attention.steps):
            weakest = attention_metrics(maps[k : k + 1])["min_subject_attention"]
            curves.append({"step": step, "value": weakest, "series": f"weakest subject attention ({label})"})
    return curves


def _summary(req: Request, base: GenerationResult, ctrl: GenerationResult) -> str:
    """One line: the weakest subject's attention and the subjects' overlap, baseline -> controlled (or, with no
    subject observed, what ran)."""
    run = f"(seed {req.seed}, {req.steps} steps, {'+'.join(req.methods)})"
    attention_base, attention_ctrl = _attention(base), _attention(ctrl)
    if attention_base is None or attention_ctrl is None:
        regions = f"{len(req.regions)} regions; " if req.regions else ""
        return f"{regions}no subjects ticked, so no attention maps {run}"
    mb, mc = attention_base.metrics(), attention_ctrl.metrics()
    return (
        f"weakest subject attention: baseline {mb['min_subject_attention']:.3f} → controlled "
        f"{mc['min_subject_attention']:.3f}; subject overlap {mb['subject_overlap']:.3f} → "
        f"{mc['subject_overlap']:.3f} {run}"
    )
