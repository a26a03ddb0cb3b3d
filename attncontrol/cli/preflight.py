"""Checks made before any model is loaded or any image sampled: output paths, the device, the seed, the model
folder or hub id, the number of steps against the scheduler, subjects against the tokenizers, sizes against the
configs and :mod:`attncontrol.limits`. None of them imports diffusers, and only the subject check imports
transformers (a tokenizer): a mistake found here costs seconds, not a model load and a finished image."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import AttnControlError, OptionError
from ..limits import check_image_size


def check_png(path: str, flag: str = "--out", overwrite: bool = True) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise OptionError(f"{flag} must end in .png, got {path!r}")
    if out.is_dir():
        raise OptionError(f"{flag} {path!r} is a folder; give a file name ending in .png")
    if out.exists() and not overwrite:
        raise OptionError(f"{flag} {path!r} exists and --no-clobber was given")
    return check_writable_file(out, flag)


def check_writable_file(out: Path, flag: str) -> Path:
    """``out`` can be created or replaced: its folder exists, is a folder, and is writable."""
    if out.is_dir():
        raise OptionError(f"{flag} {str(out)!r} is a folder; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise OptionError(f"{flag} {str(out)!r}: the folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise OptionError(f"{flag} {str(out)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise OptionError(f"{flag} {str(out)!r}: no permission to write there")
    return out


def check_writable_dir(path: str, flag: str) -> Path:
    """A folder that can be created or written into."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{flag} {path!r} is a file, not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent if str(probe.parent) != str(probe) else Path(".")
    if not probe.is_dir():
        raise OptionError(f"{flag} {path!r}: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OptionError(f"{flag} {path!r}: no permission to write in {str(probe)!r}")
    return out


def check_device(device: str | None, flag: str = "--device") -> str | None:
    """``None`` (the default: cuda if available), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and present here."""
    from ..loading import check_device as checked

    return checked(device, flag)


def check_model(model: str, flag: str = "--model") -> dict:
    """The model's index, read without torch or diffusers: a local folder with every component it lists, or a hub
    id that can be had (the offline message at once, before the heavy imports)."""
    from ..loading import model_index

    return model_index(model)


def _local_json(model: str, *parts: str) -> dict | None:
    from ..shapes import resolve_model

    path = Path(resolve_model(model)).expanduser().joinpath(*parts)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


def check_steps(model: str, steps: int, flag: str = "--steps") -> None:
    """At most the scheduler's training timesteps (read from a local folder's scheduler config)."""
    config = _local_json(model, "scheduler", "scheduler_config.json")
    limit = int((config or {}).get("num_train_timesteps") or 0)
    if limit and steps > limit:
        raise OptionError(
            f"{flag} {steps}: the scheduler of {model!r} has {limit} training timesteps; use at most {limit}"
        )


def check_size(model: str, height: int | None, width: int | None) -> None:
    """Positive multiples of what the family needs (the VAE's factor, times the patch of transformer families)."""
    from ..loading import size_multiple

    step = size_multiple(_local_json(model, "model_index.json") or {}, _local_json(model, "vae", "config.json"))
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % step):
            raise OptionError(f"{flag} must be a positive multiple of {step} for this model, got {value}")
    check_image_size(height, width, ("--height", "--width"))


def check_regions(model: str, controls) -> None:
    """A family whose adapter refuses regional prompting, refused before the model loads (the reason is the
    adapter's, given once it loads; here the class is named)."""
    from ..loading import REGIONS_UNSUPPORTED

    if not any(c.extra_text() for c in controls):
        return
    name = str((_local_json(model, "model_index.json") or {}).get("_class_name", ""))
    if name in REGIONS_UNSUPPORTED:
        raise OptionError(f"--region: regional prompting does not support {name} yet ({model!r}); drop --region")


def check_subjects(model: str, prompts: list[str], subjects) -> None:
    """Subjects resolve in every text stream the model attends to (tokenizers only, no model)."""
    from ..loading import load_token_streams
    from ..tokens import resolve_subjects

    if not subjects:
        return
    streams = load_token_streams(model)  # a model that cannot be had is reported here, before the heavy imports
    for prompt in prompts:
        for _, _, tokenizer in streams:
            limit = None if tokenizer.model_max_length > 10_000 else int(tokenizer.model_max_length)
            try:
                resolve_subjects(tokenizer, prompt, list(subjects), limit)
            except AttnControlError:
                raise
            except ValueError as err:
                raise OptionError(str(err)) from None
