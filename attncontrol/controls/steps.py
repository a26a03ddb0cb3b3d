"""What a method's step options mean on a schedule of any length, few-step models included.

The methods' step options are step indices, as their references give them for 50-step schedules (diffusers' A&E:
``max_iter_to_alter=25``, thresholds at steps 0, 10 and 20): an int is a loop index over the scheduler's timesteps,
whatever the schedule's length, so a run matches its reference at every step count. On a distilled model that
samples in 4 or 8 steps an index past the schedule never comes: "the first 25 of 50 steps" becomes "every step",
a refinement at step 10 does not happen. :func:`step_rules` says exactly what each option does at ``num_steps``
(which steps it names, which lie beyond the schedule, and what each was as a fraction of the reference's 50), and
``start``/``stop`` also take a fraction of the schedule (``stop=0.5`` is "the first half" at any length). A window
that has no step in the schedule is refused when the run is prepared (:meth:`Control.check_window`), never silently
skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Control, step_index
from .options import method_fields

REFERENCE_STEPS = 50  # the schedule length the methods' published step indices were chosen for


@dataclass(frozen=True)
class StepRule:
    """One step option of a method at ``num_steps``: the steps it names that the schedule has, those beyond it."""

    option: str
    value: object
    steps: tuple[int, ...]
    beyond: tuple[int, ...]

    def text(self) -> str:
        named = ", ".join(map(str, self.steps)) if self.steps else "none"
        past = f" ({', '.join(map(str, self.beyond))} beyond the schedule)" if self.beyond else ""
        return f"{self.option}: steps {named}{past}"


def _as_fraction(value: int) -> str:
    return f"{value / REFERENCE_STEPS:g}"


def window_text(cfg: Control, num_steps: int) -> str:
    """The steps a method acts at: ``"steps 0-24 (25 of 50)"``."""
    first, stop = cfg.window(num_steps)
    stop = min(stop, num_steps)
    if first >= stop:
        return f"no step (start {cfg.start!r} is past the {num_steps}-step schedule)"
    span = f"{first}" if stop - first == 1 else f"{first}-{stop - 1}"
    return f"steps {span} ({stop - first} of {num_steps})"


def step_rules(cfg: Control, num_steps: int) -> list[StepRule]:
    """Each step-valued option of ``cfg`` (``unit="steps"`` in its metadata, or a ``{step: value}`` dict of
    thresholds) at ``num_steps``, ``start``/``stop`` left to :func:`window_text`."""
    rules = []
    for spec in method_fields(type(cfg)):
        if spec.name in ("start", "stop"):
            continue
        value = getattr(cfg, spec.name)
        if spec.name == "thresholds" and isinstance(value, dict):
            named = sorted(value)
        elif spec.meta.unit != "steps" or value is None:
            continue
        elif isinstance(value, (tuple, list)):
            named = sorted(value)
        else:  # a count of leading steps (Refocus's early_steps): steps 0 .. value - 1
            named = list(range(step_index(value, num_steps)))
        indices = sorted({step_index(v, num_steps) for v in named})
        rules.append(
            StepRule(
                spec.name,
                value,
                tuple(i for i in indices if i < num_steps),
                tuple(i for i in indices if i >= num_steps),
            )
        )
    return rules


def steps_markdown(methods: dict[str, type[Control]], lengths: tuple[int, ...] = (50, 8, 4)) -> str:
    """The README's table of what each method's default steps are at each schedule length (``attncontrol methods
    --steps-markdown``), computed from the methods' defaults."""
    head = "| method | acts at (window) | " + " | ".join(f"{n} steps" for n in lengths) + " |"
    rows = [head, "|---|---|" + "---|" * len(lengths)]
    for key, cls in methods.items():
        cfg = default_control(cls)
        if cfg is None:
            continue
        if cfg.stop is None:
            stop = "the end"
        elif isinstance(cfg.stop, float):
            stop = f"{cfg.stop:.4g} of the schedule"
        else:
            stop = f"step {cfg.stop} ({_as_fraction(cfg.stop)} of 50)"
        window = f"{cfg.start!r} .. {stop}"
        cells = []
        for n in lengths:
            parts = [window_text(cfg, n)] + [r.text() for r in step_rules(cfg, n)]
            cells.append("; ".join(parts))
        rows.append(f"| `{key}` | {window} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def default_control(cls: type[Control]) -> Control | None:
    """The method with its defaults (and placeholder subjects, boxes or regions, which no step option depends
    on)."""
    placeholders: tuple[dict[str, Any], ...] = (
        {"subjects": ["a", "b"]},
        {"boxes": {"a": (0.0, 0.0, 0.5, 1.0), "b": (0.5, 0.0, 1.0, 1.0)}},
        {"regions": [("a", (0.0, 0.0, 0.5, 1.0)), ("b", (0.5, 0.0, 1.0, 1.0))]},
        {},
    )
    for kwargs in placeholders:
        try:
            return cls(**kwargs)
        except (TypeError, ValueError):
            continue
    return None
