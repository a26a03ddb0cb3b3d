"""Batch state on disk: the manifest (one JSON line per finished item, written after its PNG is in place),
the failures, and the per-process parts that are merged into them."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_bytes, read_json_lines


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
