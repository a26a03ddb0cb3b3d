"""Batch inputs: prompt files (.txt, .jsonl, .csv) and built-in prompt sets -> entries, each line checked."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..controls import METHODS, parse_boxes
from ..controls.boxes import region_list
from ..controls.options import field_key, method_key, parse_methods
from ..controls.refocus import Refocus  # its module: the package sets the class at run time
from ..errors import AttnControlError
from ..limits import MAX_SEEDS, SEED_RANGE

AE_SETS = {
    "ae-animals": ("animals",),
    "ae-animal-objects": ("animals_objects",),
    "ae-objects": ("objects",),
    "ae-all": ("animals", "animals_objects", "objects"),
}
# GenEval (djghosh13/geneval, MIT): evaluation_metadata.jsonl, 553 prompts in six tasks
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# T2I-CompBench (Karine-Huang/T2I-CompBench, MIT): the 2D-spatial test prompts, "a OBJ1 RELATION a OBJ2"
T2I_SPATIAL = re.compile(
    r"^(?:a|an|the) (.+?) (on side of|next to|near|on the left of|on the right of|on the bottom of|on the top of) "
    r"(?:a|an|the) (.+)$"
)
PROMPT_SETS = {
    **AE_SETS,
    "geneval": GENEVAL_TASKS,
    **{f"geneval-{task.replace('_', '-')}": (task,) for task in GENEVAL_TASKS},
    "t2i-compbench-spatial": ("spatial",),
    **{f"t2i-compbench-{task.replace('_', '-')}": (task,) for task in ("color", "shape", "texture", "non_spatial")},
    "t2i-compbench-color-2023": ("color_2023",),
    # the shapes world (attncontrol.shapes.prompts): drawn by the shipped `--model shapes`, scored with no weights
    "shapes": ("two", "spatial", "count"),
    **{f"shapes-{task}": (task,) for task in ("two", "spatial", "count")},
}
# the T2I-CompBench sets whose subjects and question phrases come from attncontrol.phrases (no metadata upstream)
T2I_PHRASE_FILES = {
    "color": "t2i_compbench_color_val.txt",
    "color_2023": "t2i_compbench_color_val_2023.txt",
    "shape": "t2i_compbench_shape_val.txt",
    "texture": "t2i_compbench_texture_val.txt",
    "non_spatial": "t2i_compbench_non_spatial_val.txt",
}
ENTRY_KEYS = {"prompt", "subjects", "boxes", "regions", "seeds", "methods", "options", "negative_prompt"}


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
    # the regions method's (sub-prompt, [box, ...]) pairs, checked: jsonl [["a red car", [x0, y0, x1, y1]], ...],
    # csv "a red car@x0,y0,x1,y1|a dog@..."
    regions: list | None = None


def parse_seeds(text) -> list[int]:
    """``"0-63"``, ``"0,1,5"``, ``"0-3,10"`` or a list of ints -> seeds, each in a torch generator's range and at
    most :data:`~attncontrol.limits.MAX_SEEDS` of them (a range is counted before it is expanded)."""
    lo, hi = SEED_RANGE
    if isinstance(text, list):
        for s in text:
            if isinstance(s, bool) or not isinstance(s, int) or not lo <= s <= hi:
                raise ValueError(f"seeds must be integers between {lo} and {hi}, got {s!r}")
        if len(text) > MAX_SEEDS:
            raise ValueError(f"{len(text)} seeds; at most {MAX_SEEDS} per batch")
        return list(text)
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise ValueError(f"seeds must look like '0-63', '0,1,5' or a list of integers, got {text!r}")
    seeds: list[int] = []
    count = 0
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m[1]), int(m[2])
            if b < a:
                raise ValueError(f"seed range {part!r} runs backwards")
        elif part.isdigit():
            a = b = int(part)
        else:
            raise ValueError(f"seeds must look like '0-63' or '0,1,5' (integers >= 0), got {part!r}")
        if b > hi:
            raise ValueError(f"seed {b} in {part!r} is out of range: seeds are between {lo} and {hi}")
        count += b - a + 1
        if count > MAX_SEEDS:
            more = "" if part == text.strip() else " or more"
            raise ValueError(f"{text!r} asks for {count}{more} seeds; one batch takes at most {MAX_SEEDS}")
        seeds.extend(range(a, b + 1))
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
        regions = raw.get("regions")
        regions = region_list(regions, "regions") if regions not in (None, "", []) else None
        seeds = parse_seeds(raw["seeds"]) if raw.get("seeds") not in (None, "", []) else None
        methods = raw.get("methods")
        if isinstance(methods, list):
            methods = ",".join(methods)
        methods = [m.strip() for m in str(methods).split(",") if m.strip()] if methods else None
        # each comma-separated entry is one run ("a+b" combines); check each, and each run once
        runs = ["+".join(parse_methods(m, METHODS, "methods", ValueError)) or "none" for m in methods or []]
        repeated = sorted({r for r in runs if runs.count(r) > 1})
        if repeated:
            raise ValueError(f"methods: each run may be given once, got {', '.join(repeated)} more than once")
        options = raw.get("options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"'options' must map method names to their settings, got {options!r}")
        options = {
            method_key(k): ({field_key(f): v for f, v in fields.items()} if isinstance(fields, dict) else fields)
            for k, fields in options.items()
        }
    except (ValueError, TypeError) as err:
        raise BatchInputError(f"{source}: {err}") from None
    negative = raw.get("negative_prompt")
    return Entry(prompt.strip(), source, subjects, boxes, seeds, methods, options, negative, regions)


def read_entries(path: str | Path, auto: bool = False) -> list[Entry]:
    """Parse a prompt file; any malformed line raises :class:`BatchInputError` naming it."""
    path = Path(path)
    if path.is_dir():
        raise BatchInputError(f"prompt file {str(path)!r} is a folder; give a .txt, .jsonl or .csv file")
    if not path.is_file():
        raise BatchInputError(f"prompt file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    entries = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark is not part of the first prompt
    except UnicodeDecodeError as err:
        raise BatchInputError(
            f"prompt file {path.name!r} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
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
        _check_csv_quotes(text, path.name)
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames and "meta_prompt" in reader.fieldnames and "obj1" in reader.fieldnames:
            return _hrs_entries(reader, path.name)
        if reader.fieldnames and {"Prompts", "Category"} <= set(reader.fieldnames):
            return _drawbench_entries(reader, path.name)
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


def _check_csv_quotes(text: str, name: str) -> None:
    """A quote that is never closed would make the rest of the file one prompt: refuse it, naming its line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        for _ in reader:
            start = reader.line_num + 1
    except csv.Error as err:
        raise BatchInputError(
            f"{name}:{start}: {err} (a quote opened on this line is never closed?); close it, "
            'or double a quote inside a quoted field ("")'
        ) from None


def prompt_set(name: str) -> list[Entry]:
    """A built-in prompt set, each prompt with its subjects (see ``attncontrol/data/README.md`` for the sources,
    licences and the rule that gives the subjects). ``source`` is ``SET:N``, N the line of the set's own file."""
    if name not in PROMPT_SETS:
        raise BatchInputError(f"unknown prompt set {name!r}; choose from {', '.join(PROMPT_SETS)}")
    if name not in AE_SETS:
        entries: list[Entry] = list(_benchmark_set(name))
        return entries
    data = json.loads(_data("ae_prompts.json"))
    return [
        Entry(p, f"{name}:{i}", auto_subjects(p))
        for i, p in enumerate((p for group in PROMPT_SETS[name] for p in data[group]), 1)
    ]


def _benchmark_set(name: str) -> list[BenchmarkEntry]:
    """A built-in set of a benchmark (every set but Attend-and-Excite's ``ae-*``): entries with its metadata."""
    if name.startswith("geneval"):
        return [e for e in _geneval() if e.task in PROMPT_SETS[name]]
    if name.startswith("shapes"):
        return _shapes(name)
    if name == "t2i-compbench-spatial":
        return _t2i_spatial()
    if name.startswith("t2i-compbench-"):
        return _t2i_phrases(name, PROMPT_SETS[name][0])
    raise BatchInputError(f"{name!r} is not a benchmark's prompt set")


def _data(filename: str) -> str:
    return resources.files("attncontrol").joinpath(f"data/{filename}").read_text(encoding="utf-8")


def geneval_subjects(record: dict) -> list[str]:
    """GenEval's own objects as subjects: each ``include`` class, made plural by GenEval's rule
    (``create_prompts.py:make_plural``: +"es" after an "s", else +"s") when its count is above one. A name
    that occurs more than once in the prompt ("a photo of an orange orange") is its last occurrence."""
    prompt, out = record["prompt"], []
    for clause in record["include"]:
        name = clause["class"]
        if clause["count"] > 1:
            name += "es" if name.endswith("s") else "s"
        hits = len(re.findall(rf"(?<![\w-]){re.escape(name)}(?![\w-])", prompt))
        if not hits:
            raise BatchInputError(f"GenEval prompt {prompt!r} does not contain its object {name!r}")
        out.append(name if hits == 1 else f"{name}#{hits}")
    return out


@dataclass
class BenchmarkEntry(Entry):
    """An entry from a benchmark (a built-in set, or a benchmark's own CSV): ``eval`` scores it by its rules."""

    task: str = ""
    metadata: dict = field(default_factory=dict)
    benchmark: str = ""  # "geneval", "t2i-compbench", "hrs", "drawbench", "shapes"; by default from the source
    # options the set gives a method when it runs (the shapes set: SynGen's colour -> shape bindings); --set wins
    method_defaults: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.benchmark:
            self.benchmark = "geneval" if self.source.startswith("geneval") else "t2i-compbench"

    def benchmark_record(self) -> dict:
        return {"benchmark": self.benchmark, "task": self.task, "metadata": self.metadata}


def _geneval() -> list[BenchmarkEntry]:
    out = []
    for n, line in enumerate(_data("geneval_metadata.jsonl").splitlines(), 1):
        record = json.loads(line)
        out.append(
            BenchmarkEntry(
                record["prompt"], f"geneval:{n}", geneval_subjects(record), task=record["tag"], metadata=record
            )
        )
    return out


def _shapes(name: str) -> list[BenchmarkEntry]:
    """The shapes world's prompts; N in ``SET:N`` counts within the named set."""
    from ..shapes.prompts import prompt_specs

    specs = [s for task in PROMPT_SETS[name] for s in prompt_specs(task)]
    return [
        BenchmarkEntry(
            s["prompt"],
            f"{name}:{n}",
            s["subjects"],
            s["boxes"],
            task=s["task"],
            metadata=s["metadata"],
            benchmark="shapes",
            method_defaults={"syngen": {"bindings": s["bindings"]}},
        )
        for n, s in enumerate(specs, 1)
    ]


def _t2i_spatial() -> list[BenchmarkEntry]:
    out = []
    for n, prompt in enumerate(_data("t2i_compbench_spatial_val.txt").splitlines(), 1):
        m = T2I_SPATIAL.match(prompt)
        if m is None:
            raise BatchInputError(f"t2i-compbench-spatial:{n}: {prompt!r} does not fit 'a OBJ1 RELATION a OBJ2'")
        obj1, relation, obj2 = m.groups()
        out.append(
            BenchmarkEntry(
                prompt,
                f"t2i-compbench-spatial:{n}",
                [obj1, obj2],
                task="spatial",
                metadata={"obj1": obj1, "relation": relation, "obj2": obj2},
            )
        )
    return out


def _t2i_phrases(name: str, task: str) -> list[BenchmarkEntry]:
    """T2I-CompBench's attribute and non-spatial sets: subjects and question phrases by ``attncontrol.phrases``."""
    from ..phrases import noun_phrases

    out = []
    for n, prompt in enumerate(_data(T2I_PHRASE_FILES[task]).splitlines(), 1):
        phrases = noun_phrases(prompt)
        if not phrases:
            raise BatchInputError(f"{name}:{n}: no noun phrase found in {prompt!r}")
        out.append(
            BenchmarkEntry(
                prompt,
                f"{name}:{n}",
                [p.subject for p in phrases],
                task=task.removesuffix("_2023"),
                metadata={"phrases": [p.text for p in phrases]},
            )
        )
    return out


def record_entry(record: dict) -> BenchmarkEntry | None:
    """The benchmark entry of a manifest record: the copy ``batch`` recorded (``benchmark``), else the built-in
    set's entry its ``source`` names (records written before the copy was kept), else None."""
    bench = record.get("benchmark")
    if isinstance(bench, dict) and isinstance(bench.get("metadata"), dict):
        return BenchmarkEntry(
            record.get("prompt", ""),
            str(record.get("source") or ""),
            None,
            task=str(bench.get("task", "")),
            metadata=bench["metadata"],
            benchmark=str(bench.get("benchmark", "")),
        )
    return benchmark_entry(record.get("source"))


def benchmark_entry(source: str | None) -> BenchmarkEntry | None:
    """The built-in set's entry a batch record came from (its ``source`` is ``SET:N``), or None for other sources."""
    if source is None:
        return None
    name, _, line = source.rpartition(":")
    if name not in PROMPT_SETS or name.startswith("ae-") or not line.isdigit():
        return None
    return _set_index(name).get(source)


@cache
def _set_index(name: str) -> dict[str, BenchmarkEntry]:
    return {e.source: e for e in _benchmark_set(name)}


HRS_LEVELS = {2: "easy", 3: "medium", 4: "hard"}  # HRS-Bench's spatial levels, by the number of objects


def _hrs_entries(reader: csv.DictReader, name: str) -> list[Entry]:
    """HRS-Bench's spatial CSV (``meta_prompt,obj1..obj4,rel1,rel2,...``): the prompt is ``meta_prompt``, the
    subjects are its objects (each occurs once in its prompt), the level follows from their number."""
    entries: list[Entry] = []
    for n, row in enumerate(reader, 2):
        source = f"{name}:{n}"
        prompt = (row.get("meta_prompt") or "").strip()
        objects = [row[k].strip() for k in ("obj1", "obj2", "obj3", "obj4") if (row.get(k) or "").strip()]
        if not prompt or len(objects) not in HRS_LEVELS:
            raise BatchInputError(
                f"{source}: an HRS-Bench row needs a meta_prompt and 2 to 4 objects, got {prompt!r} with {objects}"
            )
        meta = {"objects": objects, "rel1": (row.get("rel1") or "").strip(), "rel2": (row.get("rel2") or "").strip()}
        entries.append(
            BenchmarkEntry(prompt, source, objects, task=HRS_LEVELS[len(objects)], metadata=meta, benchmark="hrs")
        )
    if not entries:
        raise BatchInputError(f"{name}: no prompts")
    return entries


def _drawbench_entries(reader: csv.DictReader, name: str) -> list[Entry]:
    """DrawBench's sheet exported as CSV (``Prompts,Category``). The data names no subjects: they come from the
    noun-phrase rule of ``attncontrol.phrases`` (as for T2I-CompBench's free-form sets); the category is kept."""
    from ..phrases import noun_phrases

    entries: list[Entry] = []
    for n, row in enumerate(reader, 2):
        prompt = (row.get("Prompts") or "").strip()
        if not prompt:
            raise BatchInputError(f"{name}:{n}: an empty prompt")
        phrases = noun_phrases(prompt)
        meta = {"phrases": [p.text for p in phrases]}
        subjects = [p.subject for p in phrases] or None
        category = (row.get("Category") or "").strip()
        entries.append(
            BenchmarkEntry(prompt, f"{name}:{n}", subjects, task=category, metadata=meta, benchmark="drawbench")
        )
    if not entries:
        raise BatchInputError(f"{name}: no prompts")
    return entries
