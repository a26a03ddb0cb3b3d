"""Files that must never be half-written: PNGs with their parameters, JSON lines, whole-file rewrites."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def jsonable(value):
    """Dataclass dicts -> JSON-ready values (tuples to lists, dict keys to str)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def finite(value):
    """``value`` with every non-finite float (NaN, inf) replaced by None, so it can be written as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_temporary(path: Path, write) -> Path:
    """``write(fileobj)`` into a new temporary file beside ``path`` (``.NAME.*.tmp``), fsynced; removed again if
    anything fails (a full disk, ...). Returns the temporary's path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as a plain open() would create it (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file in ``path``'s folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def png_writer(image, text: dict[str, str] | None = None):
    """``write(fileobj)`` that saves ``image`` as PNG with ``text`` chunks (for :func:`atomic_write_bytes`)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    return lambda fh: image.save(fh, format="PNG", pnginfo=info)


def atomic_save_png(image, path: Path, text: dict[str, str] | None = None) -> None:
    """Write a PNG with text chunks atomically: never a half-written PNG at ``path``."""
    atomic_write_bytes(path, png_writer(image, text))


@contextmanager
def _naming(path: Path):
    """An OSError without a file name (a full disk reported by write or fsync) gets ``path``'s, so its message
    says which output could not be written."""
    try:
        yield
    except OSError as err:
        if not err.filename:
            err.filename = str(path)
        raise


class StagedOutputs:
    """The outputs of one run (an image, its trace, a folder of maps) written to temporaries beside their targets,
    then put in place together by :meth:`commit`: a run that fails while writing any of them (a full disk, a
    folder that went away) leaves none of them, and :meth:`discard` removes the temporaries. As a context manager:
    committed when the block ends normally, discarded when it raises."""

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []  # (temporary, target)
        self._folders: list[tuple[Path, Path]] = []

    def file(self, path, write) -> None:
        path = Path(path)
        with _naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files.append((_write_temporary(path, write), path))

    def folder(self, path, fill):
        """``fill(temporary folder)`` writes the files; :meth:`commit` moves each into ``path`` (created if
        needed; other files there are kept). Returns what ``fill`` returned."""
        path = Path(path)
        with _naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            self._folders.append((tmp, path))
            return fill(tmp)

    def commit(self) -> None:
        for tmp, path in self._files:
            os.replace(tmp, path)
        for tmp, path in self._folders:
            path.mkdir(parents=True, exist_ok=True)
            for item in sorted(tmp.iterdir()):
                os.replace(item, path / item.name)
            tmp.rmdir()
        self._files, self._folders = [], []

    def discard(self) -> None:
        import shutil

        for tmp, _ in self._files:
            tmp.unlink(missing_ok=True)
        for tmp, _ in self._folders:
            shutil.rmtree(tmp, ignore_errors=True)
        self._files, self._folders = [], []

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()


def json_bytes(value) -> bytes:
    """Strict JSON (NaN/inf as null) in UTF-8. A lone surrogate (a prompt read from a ``"\\ud800"`` escape) has no
    UTF-8 form: that record is written with ASCII escapes instead, so a log line is never lost to it."""
    try:
        return json.dumps(finite(value), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(finite(value), ensure_ascii=True, allow_nan=False).encode("ascii")


def append_json_line(path: Path, record: dict) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync: a crash leaves either the
    whole line or (rarely) a truncated last line, which readers skip."""
    data = json_bytes(record) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_lines(path: Path) -> list[dict]:
    """Every complete, parseable line; a truncated last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
