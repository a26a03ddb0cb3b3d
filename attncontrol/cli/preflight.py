"""Checks made before any model is loaded or any image sampled: output paths, the device, the seed, the number
of steps against the scheduler, subjects against the tokenizers, sizes against the configs. A mistake found
here costs a second, not a finished image."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import AttnControlError, ModelLoadError, OptionError

SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes


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


def check_seed(seed: int, flag: str = "--seed") -> int:
    lo, hi = SEED_RANGE
    if not lo <= seed <= hi:
        raise OptionError(f"{flag} must be between {lo} and {hi} (a torch generator's range), got {seed}")
    return seed


def check_device(device: str | None, flag: str = "--device") -> str | None:
    """``None`` (the default: cuda if available), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and present here."""
    if device is None:
        return None
    name, _, index = device.partition(":")
    if name not in ("cpu", "cuda", "mps") or (index and (name != "cuda" or not index.isdigit())):
        raise OptionError(f"{flag} must be cpu, cuda, cuda:N or mps, got {device!r}")
    import torch

    if name == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{flag} {device}: this machine has no CUDA device (or this torch has no CUDA support)")
        if index and int(index) >= torch.cuda.device_count():
            raise OptionError(f"{flag} {device}: there are {torch.cuda.device_count()} CUDA devices")
    if name == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"{flag} mps: MPS is not available on this machine")
    return device


def _local_json(model: str, *parts: str) -> dict | None:
    path = Path(model).expanduser().joinpath(*parts)
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
        raise OptionError(f"{flag} {steps}: the scheduler of {model!r} has {limit} training timesteps; use at most "
                          f"{limit}")  # fmt: skip


def check_size(model: str, height: int | None, width: int | None) -> None:
    """Positive multiples of what the family needs (the VAE's factor, times the patch of transformer families)."""
    vae = _local_json(model, "vae", "config.json")
    index = _local_json(model, "model_index.json") or {}
    factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae and vae.get("block_out_channels") else 8
    patch = 2 if index.get("_class_name") in ("StableDiffusion3Pipeline", "FluxPipeline") else 1
    step = max(8, factor * patch)
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % step):
            raise OptionError(f"{flag} must be a positive multiple of {step} for this model, got {value}")


def check_subjects(model: str, prompts: list[str], subjects) -> None:
    """Subjects resolve in every text stream the model attends to (tokenizers only, no model)."""
    from ..loading import load_token_streams
    from ..tokens import resolve_subjects

    if not subjects:
        return
    try:
        streams = load_token_streams(model)
    except ModelLoadError:
        return  # the model load reports it
    for prompt in prompts:
        for _, _, tokenizer in streams:
            limit = None if tokenizer.model_max_length > 10_000 else int(tokenizer.model_max_length)
            try:
                resolve_subjects(tokenizer, prompt, list(subjects), limit)
            except AttnControlError:
                raise
            except ValueError as err:
                raise OptionError(str(err)) from None
