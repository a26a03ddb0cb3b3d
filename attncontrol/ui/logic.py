"""What the Gradio app does, without Gradio: request validation, the token table, box drawing, and a
:class:`Runner` that makes the baseline and the controlled image (same seed) with their attention maps.

``app.py`` holds only the layout and turns :class:`DemoError` into ``gr.Error``; everything here is plain Python
and unit-tested. Method parameters come from the controls' dataclasses (:func:`method_params`), so a new method
appears in the app with its defaults by being added to ``attncontrol.controls.METHODS``; every value a user types
is checked by the same validator as the command line's and bounded (:data:`APP_RANGES`).
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..controls import METHODS, parse_boxes
from ..controls.options import FieldSpec, build_controls, method_fields, option_value, takes_boxes
from ..errors import AttnControlError

# The app's bounds per option (a public demo must not be made to run for hours): by field name, the same name
# meaning the same thing in every method; other ints 0..100, other floats -1000..1000.
APP_RANGES: dict[str, tuple[float, float]] = {
    "start": (0, 1000), "stop": (0, 1000), "max_refinement_steps": (0, 50), "iterations": (1, 100),
    "early_steps": (0, 1000), "kernel_size": (1, 9), "seed": (0, 2**31 - 1), "scale_factor": (0, 2000),
    "softmax_scale": (0.1, 1000), "lr": (0, 1e4), "velocity_scale": (0, 1000),
}  # fmt: skip
DEFAULT_RANGES = {"int": (0, 100), "float": (-1000.0, 1000.0)}


class DemoError(AttnControlError, ValueError):
    """A user mistake in the app (shown in the page; the app keeps serving)."""


class DemoCancelled(DemoError):
    """The client went away; the run stopped at the end of a step."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (a public demo must not be made to run for hours)."""

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
        if self.kind not in ("int", "float"):
            return None
        return APP_RANGES.get(self.name, DEFAULT_RANGES[self.kind])

    def shown(self) -> Any:
        """The default as the app shows it (a text field gets the command line's form)."""
        if self.kind != "text":
            return self.default
        from ..cli.commands import _show

        return "" if self.default is None else __import__("json").dumps(_show(self.default))


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
    if param.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        _, checked = option_value(METHODS, param.method, param.name, value, where, text=True)
    except AttnControlError as err:
        raise DemoError(str(err)) from None
    bounds = param.bounds
    if bounds and isinstance(checked, (int, float)) and not bounds[0] <= checked <= bounds[1]:
        raise DemoError(f"{where} must be between {bounds[0]} and {bounds[1]} in this app, got {checked}")
    return checked


def token_rows(tokenizer, prompt: str) -> list[list]:
    """``[index, token, word]`` for the prompt's tokens (start/end of text included), for the token table."""
    from ..tokens import tokenize

    if not prompt or not prompt.strip():
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


def parse_subjects(picked, typed: str | None) -> list:
    """Ticked words plus typed ones (``"red car, cat#2, 5"``; digits are token indices), without repeats."""
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

    @property
    def observed(self) -> list:
        """Whose attention to show: the subjects, or the boxes' subjects for Refocus alone."""
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
) -> Request:
    """Validate everything a user typed; raise :class:`DemoError` naming the bad value."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise DemoError("type a prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise DemoError(f"the prompt has {len(prompt)} characters; at most {limits.max_prompt_chars}")
    methods = list(methods or [])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise DemoError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    if not methods:
        raise DemoError(f"pick at least one method ({', '.join(METHODS)})")
    if len(subjects) > limits.max_subjects:
        raise DemoError(f"{len(subjects)} subjects; at most {limits.max_subjects}")
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
    if any(m not in boxed for m in methods) and not subjects:
        raise DemoError(f"pick the subjects for {', '.join(m for m in methods if m not in boxed)} (tick or type them)")
    ints = {}
    for label, value, lo, hi in (
        ("steps", steps, 1, limits.max_steps),
        ("height", height, limits.min_side, limits.max_side),
        ("width", width, limits.min_side, limits.max_side),
        ("seed", seed, 0, 2**32 - 1),
    ):
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise DemoError(f"{label} must be a whole number, got {value!r}") from None
        if number != value and not (isinstance(value, float) and value.is_integer()):
            raise DemoError(f"{label} must be a whole number, got {value!r}")
        if not lo <= number <= hi:
            raise DemoError(f"{label} must be between {lo} and {hi}, got {number}")
        ints[label] = number
    for label in ("height", "width"):
        if ints[label] % 8:
            raise DemoError(f"{label} must be a multiple of 8, got {ints[label]}")
    try:
        guidance = float(guidance_scale)
    except (TypeError, ValueError):
        raise DemoError(f"guidance scale must be a number, got {guidance_scale!r}") from None
    if not 0 <= guidance <= limits.max_guidance:
        raise DemoError(f"guidance scale must be between 0 and {limits.max_guidance}, got {guidance}")
    options: dict[str, dict[str, Any]] = {m: {} for m in methods}
    by_key = {(p.method, p.name): p for p in method_params()}
    for (method, name), value in (params or {}).items():
        if method in options and (method, name) in by_key:
            checked = check_param(by_key[(method, name)], value)
            if checked != by_key[(method, name)].default:
                options[method][name] = checked
    request = Request(prompt, subjects, methods, boxes, ints["seed"], ints["steps"], guidance,
                      ints["height"], ints["width"], options)  # fmt: skip
    try:  # the one validator, as for the command line (ranges, boxes in [0, 1])
        build_controls(METHODS, methods, subjects, boxes, options, where="", subjects_from="subjects",
                       boxes_from="boxes")  # fmt: skip
    except (ValueError, TypeError) as err:
        raise DemoError(str(err)) from None
    return request


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
    (x, y), (w, h) = point, size
    corner = (min(max(x / w, 0.0), 1.0), min(max(y / h, 0.0), 1.0))
    if pending is None:
        return corner, boxes_text or ""
    (x0, x1), (y0, y1) = sorted((pending[0], corner[0])), sorted((pending[1], corner[1]))
    if x1 - x0 < 0.02 or y1 - y0 < 0.02:
        raise DemoError("that box is too small: click two opposite corners")
    entry = f"{subject}={x0:.3f},{y0:.3f},{x1:.3f},{y1:.3f}"
    return None, "; ".join(part for part in ((boxes_text or "").strip().rstrip(";").strip(), entry) if part)


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

    @property
    def tokenizer(self):
        return self.adapter.tokenizer

    def native_size(self) -> tuple[int, int]:
        return self.adapter.default_size()

    def default_guidance(self) -> float:
        import inspect

        return float(inspect.signature(self.pipe.__call__).parameters["guidance_scale"].default)

    def run(self, req: Request, progress=None, cancel: threading.Event | None = None) -> DemoResult:
        """Baseline then controlled, same seed; ``progress(done, total, what)`` is called after every step. Setting
        ``cancel`` (the client left) stops the run at the end of the current step, the pipeline restored."""
        import torch

        from ..attention import attention_metrics
        from ..pipeline import generate

        total = 2 * req.steps
        controls = build_controls(METHODS, req.methods, req.subjects, req.boxes, req.options)
        device = self.pipe._execution_device
        gen_device = "cpu" if device.type == "mps" else device
        outputs = {}
        with self._lock:
            start = time.monotonic()
            for offset, (label, ctl) in enumerate((("baseline", []), ("controlled", controls))):

                def step_done(pipe, i, t, kwargs, offset=offset, label=label):
                    if cancel is not None and cancel.is_set():
                        raise DemoCancelled("the request was cancelled: its page was closed")
                    if time.monotonic() - start > self.limits.time_limit:  # the run stops; the pipeline is restored
                        raise DemoError(f"this request ran past the app's limit of {self.limits.time_limit:.0f} s; "
                                        "use fewer steps, a smaller size or fewer refinement steps")  # fmt: skip
                    if progress is not None:
                        progress(offset * req.steps + i + 1, total, label)
                    return kwargs

                try:
                    outputs[label] = generate(
                        self.pipe, req.prompt, ctl, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                        height=req.height, width=req.width, generator=torch.Generator(gen_device).manual_seed(req.seed),
                        attention=req.observed, callback_on_step_end=step_done,
                    )  # fmt: skip
                except DemoError:
                    raise  # cancelled or over the time limit: already the user's sentence, and its class matters
                except (AttnControlError, ValueError, TypeError) as err:
                    raise DemoError(str(err)) from None
        base, ctrl = outputs["baseline"], outputs["controlled"]
        heatmaps = []
        for label, out in (("baseline", base), ("controlled", ctrl)):
            for subject in out.attention.labels[0]:
                heatmaps.append((out.attention.heatmap(subject), f"{label} · {subject}"))
        if req.boxes:
            heatmaps.append((draw_boxes(req.boxes, ctrl.images[0].size, ctrl.images[0]), "controlled · boxes"))
        curves = []
        for r in ctrl.trace:
            for name, values in r.losses.items():
                curves.append({"step": r.index, "value": float(values[0]), "series": f"{name} loss"})
        for label, out in (("baseline", base), ("controlled", ctrl)):
            maps = out.attention.maps[:, 0]
            for k, step in enumerate(out.attention.steps):
                weakest = attention_metrics(maps[k : k + 1])["min_subject_attention"]
                curves.append({"step": step, "value": weakest, "series": f"weakest subject attention ({label})"})
        mb, mc = base.attention.metrics(), ctrl.attention.metrics()
        summary = (
            f"weakest subject attention: baseline {mb['min_subject_attention']:.3f} → controlled "
            f"{mc['min_subject_attention']:.3f}; subject overlap {mb['subject_overlap']:.3f} → "
            f"{mc['subject_overlap']:.3f} (seed {req.seed}, {req.steps} steps, {'+'.join(req.methods)})"
        )
        return DemoResult(base.images[0], ctrl.images[0], heatmaps, curves, summary)
