"""Batch state on disk: the manifest (one JSON line per finished item, written after its PNG is in place), the
failures, the per-process parts that are merged into them, and the per-item claims that let several workers
share one folder.

Locks are ``flock`` locks on files in the output folder: the kernel drops them when their process ends, however
it ends, so a killed worker never leaves an item or a part locked."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from ..io import atomic_write_bytes, json_bytes, read_json_lines

CLAIMS = ".claims"
DONE = b"done"


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


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class PartFile:
    """This process's manifest or failures part, named by rank and pid, locked while the process may write it
    (a merge folds every part but deletes only unlocked ones: those of finished or dead processes)."""

    def __init__(self, out: Path, kind: str, rank: int):
        self.path = out / f"{kind}.part-{rank}-{os.getpid()}.jsonl"
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def close(self) -> None:
        """Unlock (the next merge may fold and delete it); an empty part is removed at once."""
        if self.fd is None:
            return
        if os.fstat(self.fd).st_size == 0:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def merge(out: Path) -> int:
    """Fold manifest and failure parts into manifest.jsonl / failures.jsonl (one line per item, atomic); delete the
    parts no live process holds. Merges are serialised by a lock in the folder."""
    with open(out / ".merge.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        parts = [*out.glob("manifest.part-*.jsonl"), *out.glob("failures.part-*.jsonl")]
        records = finished_records(out)
        failures: dict[str, dict] = {}
        for path in [out / "failures.jsonl", *sorted(out.glob("failures.part-*.jsonl"))]:
            for rec in read_json_lines(path):
                if isinstance(rec, dict) and "key" in rec and rec["key"] not in records:
                    failures[rec["key"]] = rec
        _rewrite(out / "manifest.jsonl", records.values())
        if failures or (out / "failures.jsonl").exists():
            _rewrite(out / "failures.jsonl", failures.values())
        for part in parts:
            try:
                fd = os.open(part, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _try_lock(fd):  # no process writes it any more: everything in it is folded above
                    part.unlink(missing_ok=True)
            finally:
                os.close(fd)
    return len(records)


def _rewrite(path: Path, records) -> None:
    data = b"".join(json_bytes(r) + b"\n" for r in records)
    atomic_write_bytes(path, lambda fh: fh.write(data))


class Claims:
    """Per-item claims in ``out/.claims``: a worker generates an item only while it holds the item's lock, and
    marks it done once its record is written; workers on one folder share the items instead of repeating them."""

    def __init__(self, out: Path):
        self.dir = out / CLAIMS
        self.dir.mkdir(parents=True, exist_ok=True)
        self.held: dict[str, int] = {}

    def take(self, key: str, image: Path) -> bool:
        """Lock ``key`` unless another worker holds it or has finished it (marked done and its ``image`` is in
        place; a done mark whose image was deleted is taken again)."""
        fd = os.open(self.dir / key, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            os.close(fd)
            return False
        if os.read(fd, len(DONE)) == DONE and image.is_file():
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        self.held[key] = fd
        return True

    def finish(self, key: str) -> None:
        fd = self.held.pop(key)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, DONE)
        finally:
            os.close(fd)

    def release(self, key: str) -> None:
        """Give the item back (it failed or the run stopped): a later run or another worker may take it."""
        fd = self.held.pop(key, None)
        if fd is not None:
            os.close(fd)

    def release_all(self) -> None:
        for key in list(self.held):
            self.release(key)


def remove_stale_temporaries(out: Path, older_than: float = 600.0) -> int:
    """Delete the temporary files of killed runs (``.NAME.*.tmp``); recent ones may be another worker's."""
    now, removed = time.time(), 0
    for stale in out.glob(".*.tmp"):
        try:
            if now - stale.stat().st_mtime > older_than:
                stale.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
