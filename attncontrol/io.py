"""Files that must never be half-written: PNGs with their parameters, JSON lines, whole-file rewrites."""

from __future__ import annotations

import json
import math
import os
import tempfile
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


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file in ``path``'s folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as a plain open() would create it (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_png(image, path: Path, text: dict[str, str] | None = None) -> None:
    """Write a PNG with text chunks atomically: never a half-written PNG at ``path``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    atomic_write_bytes(path, lambda fh: image.save(fh, format="PNG", pnginfo=info))


def append_json_line(path: Path, record: dict) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync: a crash leaves either the
    whole line or (rarely) a truncated last line, which readers skip."""
    data = (json.dumps(finite(record), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
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
