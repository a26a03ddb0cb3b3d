"""Batch inputs: prompt files (.txt, .jsonl, .csv) and built-in prompt sets -> entries, each line checked."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..controls import METHODS, Refocus, parse_boxes
from ..errors import AttnControlError

PROMPT_SETS = {
    "ae-animals": ("animals",),
    "ae-animal-objects": ("animals_objects",),
    "ae-objects": ("objects",),
    "ae-all": ("animals", "animals_objects", "objects"),
}
ENTRY_KEYS = {"prompt", "subjects", "boxes", "seeds", "methods", "options", "negative_prompt"}


class BatchInputError(AttnControlError, ValueError):
    """A malformed input line (reported before any generation)."""


@dataclass
class Entry:
    prompt: str
    source: str  # "file:line" for error messages
    subjects: list | None = None
    boxes: dict | None = None
    seeds: list[int] | None = None
    methods: list[str] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    negative_prompt: str | None = None


def parse_seeds(text) -> list[int]:
    """``"0-63"``, ``"0,1,5"``, ``"0-3,10"`` or a list -> seeds."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):
        return [int(s) for s in text]
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m[1]), int(m[2])
            if b < a:
                raise ValueError(f"seed range {part!r} runs backwards")
            seeds.extend(range(a, b + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"seeds must look like '0-63' or '0,1,5', got {part!r}")
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return seeds


def auto_subjects(prompt: str) -> list[str]:
    """The A&E prompts' subjects: the last word of each half, split on " and " / " with "."""
    for sep in (" and ", " with "):
        if sep in prompt:
            return [half.strip().split()[-1] for half in prompt.split(sep) if half.strip()]
    raise ValueError(f"cannot pick subjects automatically from {prompt!r} (no ' and ' / ' with '); give them")


def _split_list(text) -> list:
    if text is None or text == "":
        return []
    if isinstance(text, list):
        return text
    parts = [p.strip() for p in re.split(r"[;,]", str(text)) if p.strip()]
    return [int(p) if p.isdigit() else p for p in parts]


def _entry(raw: dict, source: str, auto: bool) -> Entry:
    unknown = set(raw) - ENTRY_KEYS
    if unknown:
        raise BatchInputError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: {sorted(ENTRY_KEYS)}")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BatchInputError(f"{source}: a non-empty 'prompt' is required, got {prompt!r}")
    try:
        subjects = _split_list(raw.get("subjects")) or (auto_subjects(prompt) if auto else None)
        boxes = raw.get("boxes")
        if isinstance(boxes, str):
            boxes = parse_boxes(boxes)
        if boxes:
            boxes = Refocus(boxes=boxes).boxes  # validated and normalised to lists of boxes
        seeds = parse_seeds(raw["seeds"]) if raw.get("seeds") not in (None, "") else None
        methods = raw.get("methods")
        if isinstance(methods, list):
            methods = ",".join(methods)
        methods = [m.strip() for m in str(methods).split(",") if m.strip()] if methods else None
        for m in methods or []:
            for name in (n.strip() for n in m.replace("+", ",").split(",")):
                if name != "none" and name not in METHODS:
                    raise ValueError(f"unknown method {name!r}; choose from none, {', '.join(METHODS)}")
        options = raw.get("options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"'options' must map method names to their settings, got {options!r}")
    except (ValueError, TypeError) as err:
        raise BatchInputError(f"{source}: {err}") from None
    return Entry(prompt.strip(), source, subjects, boxes, seeds, methods, options, raw.get("negative_prompt"))


def read_entries(path: str | Path, auto: bool = False) -> list[Entry]:
    """Parse a prompt file; any malformed line raises :class:`BatchInputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"prompt file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    entries = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark is not part of the first prompt
    except UnicodeDecodeError as err:
        raise BatchInputError(f"prompt file {path.name!r} is not UTF-8 text (byte {err.start}: {err.reason}); "
                              "save it as UTF-8") from None  # fmt: skip
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise BatchInputError(f"{path.name}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(raw, dict):
                raise BatchInputError(f"{path.name}:{n}: each line must be a JSON object")
            entries.append(_entry(raw, f"{path.name}:{n}", auto))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise BatchInputError(f"{path.name}:1: the header must have a 'prompt' column, got {reader.fieldnames}")
        for n, row in enumerate(reader, 2):
            entries.append(_entry({k: v for k, v in row.items() if v not in (None, "")}, f"{path.name}:{n}", auto))
    elif suffix == ".txt":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            prompt, _, subjects = line.partition("|")
            entries.append(_entry({"prompt": prompt, "subjects": subjects.strip() or None}, f"{path.name}:{n}", auto))
    else:
        raise BatchInputError(f"prompt file must be .txt, .jsonl or .csv, got {path.name!r}")
    if not entries:
        raise BatchInputError(f"{path.name}: no prompts")
    return entries


def prompt_set(name: str) -> list[Entry]:
    if name not in PROMPT_SETS:
        raise BatchInputError(f"unknown prompt set {name!r}; choose from {', '.join(PROMPT_SETS)}")
    data = json.loads(resources.files("attncontrol").joinpath("data/ae_prompts.json").read_text())
    return [
        Entry(p, f"{name}:{i}", auto_subjects(p))
        for i, p in enumerate((p for group in PROMPT_SETS[name] for p in data[group]), 1)
    ]
