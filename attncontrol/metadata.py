"""What an image's metadata records besides its parameters: the scheduler (class and config), the device and
dtype, the library versions, and which model exactly (a hub snapshot's commit, or a local folder's fingerprint)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import __version__
from .io import finite


def model_identity(model: str) -> dict:
    """A hub id's cached snapshot commit, or a local folder's fingerprint: the sha256 of its JSON configs and of
    its weight files' names and sizes (cheap: the weights themselves are not read)."""
    from .shapes import resolve_model

    local = Path(resolve_model(model)).expanduser()
    if local.is_dir():
        h = hashlib.sha256()
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = str(path.relative_to(local)).encode()
            if path.suffix == ".json":
                h.update(rel + b"\0" + path.read_bytes())
            else:
                h.update(rel + b"\0" + str(path.stat().st_size).encode())
        return {"model_fingerprint": h.hexdigest()[:16]}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # not a repo id huggingface_hub accepts: nothing to record
        cached = None
    if isinstance(cached, str) and "/snapshots/" in cached:
        return {"model_revision": cached.split("/snapshots/")[1].split("/")[0]}
    return {}


def run_metadata(pipe, model: str) -> dict:
    import diffusers
    import torch

    from .models import get_adapter

    scheduler = pipe.scheduler
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {
        "scheduler": type(scheduler).__name__,
        "scheduler_config": json.loads(json.dumps(config, default=str)),
        "device": str(pipe._execution_device),
        "dtype": str(get_adapter(pipe).dtype).removeprefix("torch."),
        "versions": {"attncontrol": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        **model_identity(model),
    }


def strict_json(value) -> str:
    """JSON with NaN/inf written as null (``json.dumps`` would write the invalid ``NaN``)."""
    return json.dumps(finite(value), allow_nan=False)
