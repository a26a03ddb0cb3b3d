"""``attncontrol batch``: prompts x seeds x methods, resumable, crash-safe, split across processes.

Inputs: a ``.txt`` (``PROMPT`` or ``PROMPT | subject, subject``), ``.jsonl`` (prompt, subjects, boxes, seeds,
methods, options per line) or ``.csv`` (columns prompt, subjects, boxes, seeds, methods) file, or a built-in
prompt set (the Attend-and-Excite paper's 276 prompts). Output folder: one PNG per item (parameters in its
text chunk) and ``manifest.jsonl`` (one line per finished item). A rerun of the same command skips finished
items and redoes the rest. Under ``accelerate launch`` each process takes its share of the items and writes
its own manifest part; parts are merged at the end, and by any later run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .controls import Refocus, make_controls, parse_boxes, parse_methods
from .errors import AttnControlError
from .io import append_json_line, atomic_save_png, atomic_write_bytes, jsonable, read_json_lines

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
    # the subjects whose attention is measured (also for the baseline); not part of the identity
    observe: tuple | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        payload = [self.prompt, self.subjects, self.boxes, self.method, self.seed, self.options, self.negative_prompt]
        if self.settings != "{}":
            payload.append(self.settings)
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def filename(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:48] or "prompt"
        return f"{slug}__{self.method}__s{self.seed}__{self.key[:8]}.png"

    def controls(self) -> list:
        names = [] if self.method == "none" else self.method.split("+")
        boxes = json.loads(self.boxes) if self.boxes else None
        return make_controls(names, list(self.subjects or []), boxes, json.loads(self.options))


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
            parse_methods(m)
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
    text = path.read_text(encoding="utf-8")
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


def expand(
    entries: list[Entry],
    seeds: list[int],
    methods: list[str],
    options: dict | None = None,
    settings: dict | None = None,
) -> list[Item]:
    """Entries x seeds x methods -> items; fails on the first entry that cannot make its controls. ``settings``
    (model, steps, size, guidance) are part of each item's identity, so a rerun with other settings redoes it."""
    settings_json = json.dumps(settings or {}, sort_keys=True)
    items = []
    for e in entries:
        for method_text in e.methods or methods:
            names = parse_methods(method_text)
            method = "+".join(names) or "none"
            merged = {name: {**(options or {}).get(name, {}), **e.options.get(name, {})} for name in names}
            item_boxes = e.boxes if "refocus" in names else None
            try:
                make_controls(names, e.subjects, item_boxes, merged)  # validates before any generation
            except (ValueError, TypeError) as err:
                raise BatchInputError(f"{e.source}: {err}") from None
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
                        observe=tuple(e.subjects) if e.subjects else (tuple(e.boxes) if e.boxes else None),
                    )
                )
    unique: dict[str, Item] = {}
    for item in items:  # the same image asked for twice (e.g. a baseline of two lines with one prompt): once
        unique.setdefault(item.key, item)
    return list(unique.values())


# ------------------------------------------------------------------------------------------------ state


def _manifest_files(out: Path) -> list[Path]:
    return [out / "manifest.jsonl", *sorted(out.glob("manifest.part-*.jsonl"))]


def finished_records(out: Path) -> dict[str, dict]:
    """Items recorded in the manifest (or an unmerged part) whose image is in place, by key (first record wins)."""
    records: dict[str, dict] = {}
    for path in _manifest_files(out):
        for rec in read_json_lines(path):
            if isinstance(rec, dict) and "key" in rec and (out / rec.get("file", "")).is_file():
                records.setdefault(rec["key"], rec)
    return records


def finished_keys(out: Path) -> set[str]:
    """Keys of :func:`finished_records`."""
    return set(finished_records(out))


def merge(out: Path) -> int:
    """Fold manifest and failure parts into manifest.jsonl / failures.jsonl (one line per item, atomic)."""
    records = finished_records(out)
    failures: dict[str, dict] = {}
    for path in [out / "failures.jsonl", *sorted(out.glob("failures.part-*.jsonl"))]:
        for rec in read_json_lines(path):
            if isinstance(rec, dict) and "key" in rec and rec["key"] not in records:
                failures[rec["key"]] = rec
    _rewrite(out / "manifest.jsonl", records.values())
    if failures or (out / "failures.jsonl").exists():
        _rewrite(out / "failures.jsonl", failures.values())
    for part in [*out.glob("manifest.part-*.jsonl"), *out.glob("failures.part-*.jsonl")]:
        part.unlink(missing_ok=True)
    return len(records)


def _rewrite(path: Path, records) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    atomic_write_bytes(path, lambda fh: fh.write(data))


# ------------------------------------------------------------------------------------------------ run


@dataclass
class Settings:
    model: str
    steps: int = 50
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    checkpointing: bool = False

    def identity(self) -> dict:
        """What changes the image (batch size and checkpointing do not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("batch_size", "checkpointing")}


def _loss_summary(result) -> dict:
    summary: dict[str, dict] = {}
    guided = result.guided_steps
    for name in guided[0].losses if guided else []:
        values = [r.losses[name] for r in guided if name in r.losses]
        summary[name] = {"first": values[0], "last": values[-1], "steps": len(values)}
    return summary


def _observable(pipe, item: Item) -> bool:
    """Whether the item's subjects can be found in its prompt (a baseline is made even where they cannot; its
    attention metrics are then left out, and the controlled items of that line fail with the reason)."""
    from .tokens import resolve_subjects

    try:
        resolve_subjects(pipe.tokenizer, item.prompt, list(item.observe))
    except (ValueError, TypeError):
        return False
    return True


def run(
    items: list[Item], out: Path, pipe, settings: Settings, rank: int = 0, world: int = 1, progress=True, done_keys=None
):
    """Generate this process's share of the unfinished items. Returns (done, skipped, failed, seconds).
    ``done_keys``: the items finished before the run (read by every process before any of them starts)."""
    import torch

    from .pipeline import generate

    out.mkdir(parents=True, exist_ok=True)
    done_keys = finished_keys(out) if done_keys is None else done_keys
    # An item's process follows from its key alone, never from what is finished (another process may already be
    # writing): no item twice, none left out, whatever the timing.
    mine = [it for it in items if int(it.key, 16) % world == rank and it.key not in done_keys]
    skipped = sum(it.key in done_keys for it in items)
    manifest = out / f"manifest.part-{rank}.jsonl"
    failures = out / f"failures.part-{rank}.jsonl"
    device = pipe._execution_device
    gen_device = "cpu" if device.type == "mps" else device
    done = failed = 0
    start = time.perf_counter()

    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc="items", unit="img", disable=not progress or rank != 0, file=sys.stderr)

    def one_group(group: list[Item]) -> None:
        nonlocal done, failed
        t0 = time.perf_counter()
        first = group[0]
        names = [] if first.method == "none" else first.method.split("+")
        subjects = [list(it.subjects or []) for it in group] if names and first.subjects else None
        controls = make_controls(
            names, subjects, json.loads(first.boxes) if first.boxes else None, json.loads(first.options)
        )
        observe = all(it.observe and _observable(pipe, it) for it in group)
        result = generate(
            pipe,
            [it.prompt for it in group],
            controls,
            negative_prompt=[it.negative_prompt or "" for it in group]
            if any(it.negative_prompt for it in group)
            else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            generator=[torch.Generator(gen_device).manual_seed(it.seed) for it in group],
            attention=[list(it.observe) for it in group] if observe else False,
            checkpointing=settings.checkpointing,
        )
        seconds = (time.perf_counter() - t0) / len(group)
        summary = _loss_summary(result)
        for k, (it, image) in enumerate(zip(group, result.images)):
            metrics = result.attention.metrics(k) if result.attention is not None else None
            metrics = {m: None if v != v else round(v, 6) for m, v in metrics.items()} if metrics else None
            record = {
                "key": it.key,
                "file": it.filename,
                "prompt": it.prompt,
                "subjects": list(it.subjects) if it.subjects else None,
                "boxes": json.loads(it.boxes) if it.boxes else None,
                "method": it.method,
                "seed": it.seed,
                "options": json.loads(it.options),
                "settings": {**dataclasses.asdict(settings), "batch_size": len(group)},
                "losses": summary,
                "attention": {"subjects": list(it.observe), **metrics} if metrics else None,
                "seconds": round(seconds, 3),
                "source": it.source,
                "rank": rank,
                "attncontrol": __version__,
            }
            atomic_save_png(image, out / it.filename, {"parameters": json.dumps(record)})
            append_json_line(manifest, record)  # only once the image is in place
            done += 1
            bar.update(1)

    def fail(it: Item, err: BaseException) -> None:
        nonlocal failed
        append_json_line(
            failures,
            {"key": it.key, "prompt": it.prompt, "method": it.method, "seed": it.seed, "source": it.source,
             "error": f"{type(err).__name__}: {err}"},
        )  # fmt: skip
        failed += 1
        bar.update(1)

    groups: list[list[Item]] = []
    for it in mine:
        last = groups[-1] if groups else None
        compatible = (
            last
            and len(last) < settings.batch_size
            and (last[0].method, last[0].boxes, last[0].options)
            == (
                it.method,
                it.boxes,
                it.options,
            )
        )
        if compatible:
            last.append(it)
        else:
            groups.append([it])
    for group in groups:
        try:
            one_group(group)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            if len(group) == 1:
                fail(group[0], err)
                continue
            for it in group:  # isolate the failing item(s)
                try:
                    one_group([it])
                except Exception as err_one:
                    fail(it, err_one)
    bar.close()
    return done, skipped, failed, time.perf_counter() - start
