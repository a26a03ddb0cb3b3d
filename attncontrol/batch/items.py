"""Batch items: entries x seeds x methods, each with a key that identifies it across runs and processes."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..io import jsonable
from .inputs import BatchInputError, Entry


@dataclass(frozen=True)
class Item:
    """One image to make. ``key`` identifies it across runs and processes."""

    prompt: str
    subjects: tuple | None
    boxes: str | None  # canonical JSON of the boxes
    method: str  # "none" or names joined with "+"
    seed: int
    options: str  # canonical JSON of per-method options
    negative_prompt: str | None
    source: str
    settings: str = "{}"  # canonical JSON of the run settings that change the image (model, steps, size, ...)
    regions: str | None = None  # canonical JSON of the regions method's regions (None where it does not run)
    # the subjects whose attention is measured (also for the baseline); not part of the identity
    observe: tuple | None = field(default=None, compare=False)
    # canonical JSON of the benchmark entry the prompt came from ({"benchmark", "task", "metadata"}), recorded in
    # the manifest for `eval`; not part of the identity
    benchmark: str | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        fields = (self.prompt, self.subjects, self.boxes, self.method, self.seed, self.options, self.negative_prompt)
        payload: list[Any] = list(fields)
        if self.settings != "{}":
            payload.append(self.settings)
        if self.regions:  # only where there are regions: every other item keeps the key it had before them
            payload.append({"regions": self.regions})
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def filename(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:48] or "prompt"
        return f"{slug}__{self.method}__s{self.seed}__{self.key[:8]}.png"

    def controls(self) -> list:
        names = [] if self.method == "none" else self.method.split("+")
        boxes = json.loads(self.boxes) if self.boxes else None
        regions = json.loads(self.regions) if self.regions else None
        return checked_controls(names, list(self.subjects or []), boxes, json.loads(self.options), self.source, regions)


def checked_controls(names: list[str], subjects, boxes, raw_options: dict, source: str, regions=None) -> list:
    """Controls through the one request builder, every option checked against its field; errors name ``source``.
    A line's prompt is not checked here: a prompt that is not valid text fails its own items (recorded in
    failures.jsonl), not the whole batch."""
    from ..request import build_request

    return build_request(names, subjects, boxes, raw_options, text=True, where=source, regions=regions).controls


def _method_names(text: str, source: str) -> list[str]:
    from ..controls import METHODS
    from ..controls.options import parse_methods

    return parse_methods(text, METHODS, source, BatchInputError)


def expand(
    entries: list[Entry],
    seeds: list[int],
    methods: list[str],
    options: dict | None = None,
    settings: dict | None = None,
) -> list[Item]:
    """Entries x seeds x methods -> items; fails on the first entry that cannot make its controls. ``settings``
    (model, steps, size, guidance) are part of each item's identity, so a rerun with other settings redoes it."""
    from ..controls import METHODS
    from ..controls.options import takes_boxes, takes_regions

    settings_json = json.dumps(settings or {}, sort_keys=True)
    items = []
    for e in entries:
        benchmark = json.dumps(e.benchmark_record(), sort_keys=True) if hasattr(e, "benchmark_record") else None
        run = {n for text in e.methods or methods for n in _method_names(text, e.source)}
        stray = sorted(set(e.options) - run)
        if stray:
            raise BatchInputError(
                f"{e.source}: options for {', '.join(stray)}, which is not among the methods "
                f"{', '.join(sorted(run)) or 'none'}"
            )
        if e.regions and not any(takes_regions(METHODS[n]) for n in run):
            raise BatchInputError(
                f"{e.source}: regions are for the regions method, which is not among the methods "
                f"{', '.join(e.methods or methods)}"
            )
        for method_text in e.methods or methods:
            names = _method_names(method_text, e.source)
            method = "+".join(names) or "none"
            defaults = getattr(e, "method_defaults", {})  # a built-in set's options for methods that run (< --set)
            merged = {
                name: {**defaults.get(name, {}), **(options or {}).get(name, {}), **e.options.get(name, {})}
                for name in names
            }
            item_boxes = e.boxes if any(takes_boxes(METHODS[n]) for n in names) else None
            item_regions = e.regions if any(takes_regions(METHODS[n]) for n in names) else None
            checked_controls(names, e.subjects, item_boxes, merged, e.source, item_regions)  # before any generation
            for seed in e.seeds or seeds:
                items.append(
                    Item(
                        prompt=e.prompt,
                        subjects=tuple(e.subjects) if e.subjects and names else None,
                        boxes=json.dumps(jsonable(item_boxes), sort_keys=True) if item_boxes else None,
                        method=method,
                        seed=int(seed),
                        options=json.dumps(jsonable(merged), sort_keys=True),
                        negative_prompt=e.negative_prompt,
                        source=e.source,
                        settings=settings_json,
                        regions=json.dumps(jsonable(item_regions)) if item_regions else None,
                        observe=tuple(e.subjects) if e.subjects else (tuple(e.boxes) if e.boxes else None),
                        benchmark=benchmark,
                    )
                )
    unique: dict[str, Item] = {}
    for item in items:  # the same image asked for twice (e.g. a baseline of two lines with one prompt): once
        unique.setdefault(item.key, item)
    return list(unique.values())
