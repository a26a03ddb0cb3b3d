"""``attncontrol export``: a batch folder's benchmark images in the benchmarks' own folder layouts, so their
official scripts can score them (the exact protocol, with their own detectors and parsers).

- GenEval (``evaluation/evaluate_images.py`` reads ``<index:05>/metadata.jsonl`` and ``<index:05>/samples/*.png``):
  ``DEST/METHOD/geneval/<index:05>/`` with the prompt's metadata line, and ``samples/<k:05>.png``, k in seed order.
- T2I-CompBench (its scripts take the prompt from the file name ``{prompt}_{NNNNNN}.png``):
  ``DEST/METHOD/t2i-compbench/<category>/samples/{prompt}_{NNNNNN}.png``, numbered per category.

Files are copied (the batch folder is only read), each written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AttnControlError
from ..io import atomic_write_bytes

if TYPE_CHECKING:
    from ..batch.inputs import BenchmarkEntry


def export(out: str | Path, dest: str | Path, methods: list[str] | None = None) -> dict[str, int]:
    """Copy the benchmark images of ``out`` into ``dest``; returns how many images went to each layout."""
    from ..batch.inputs import record_entry
    from ..eval import load_records

    out, dest = Path(out), Path(dest)
    if dest.resolve() == out.resolve() or out.resolve() in dest.resolve().parents:
        raise AttnControlError(f"--to {str(dest)!r} is inside the batch folder; choose a folder outside it")
    records = load_records(out)
    present = list(dict.fromkeys(r["method"] for r in records))
    unknown = [m for m in methods or [] if m not in present]
    if unknown:
        raise AttnControlError(f"no image of method(s) {unknown} in {str(out)!r} (methods: {', '.join(present)})")
    groups: dict[tuple, list[tuple[dict, BenchmarkEntry]]] = {}  # (record, its benchmark entry)
    for rec in records:
        entry = record_entry(rec)
        if entry is None or entry.benchmark not in ("geneval", "t2i-compbench"):
            continue
        if methods and rec["method"] not in methods:
            continue
        groups.setdefault((rec["method"], entry.benchmark, entry.task, rec["prompt"]), []).append((rec, entry))
    counts = {"geneval": 0, "t2i-compbench": 0}
    counters: dict[tuple, int] = {}
    for (method, bench, task, prompt), items in sorted(groups.items(), key=lambda kv: _order(kv[1][0])):
        items.sort(key=lambda it: it[0]["seed"])
        if bench == "geneval":
            index = int(items[0][0]["source"].rpartition(":")[2]) - 1
            folder = dest / method / "geneval" / f"{index:05d}"
            line = json.dumps(items[0][1].metadata).encode("utf-8") + b"\n"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / "metadata.jsonl", lambda fh, line=line: fh.write(line))
            targets = [folder / "samples" / f"{k:05d}.png" for k in range(len(items))]
        else:
            folder = dest / method / "t2i-compbench" / task / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            start = counters.get((method, task), 0)
            counters[(method, task)] = start + len(items)
            targets = [folder / f"{prompt}_{start + k:06d}.png" for k in range(len(items))]
        for (rec, _), target in zip(items, targets):
            _copy(out / rec["file"], target)
        counts[bench] += len(items)
    return counts


def _order(item) -> tuple:
    rec, _ = item
    name, _, line = str(rec.get("source") or "").rpartition(":")
    return (rec["method"], name, int(line) if line.isdigit() else 0)


def _copy(src: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(target)
