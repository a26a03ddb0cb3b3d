"""Loading pipelines from a hub id or a local folder, with clear errors offline; safetensors only by default."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import ModelLoadError
from .hub import check_pipeline_tokenizers, check_tokenizer, hub_kwargs, is_hub_id, unavailable_message

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """``None`` = fp16 on CUDA, fp32 elsewhere."""
    if dtype is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))}, got {dtype!r}") from None


def load_pipeline(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
):
    """Load a diffusers text-to-image pipeline from a hub id or a local folder (diffusers layout).

    Only ``.safetensors`` weights are read unless ``allow_pickle=True`` (pickled ``.bin`` files can run code).
    """
    from diffusers import DiffusionPipeline

    device = device or default_device()
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    local = Path(model).expanduser()
    is_local = local.exists()
    if is_local and not (local / "model_index.json").is_file():
        raise ModelLoadError(
            f"{model!r} is a folder but not a diffusers pipeline (no model_index.json); pass a folder saved "
            "with `pipe.save_pretrained(...)` or downloaded with `hf download <model id> --local-dir <folder>`"
        )
    if not is_local and not is_hub_id(model):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    kwargs = {"torch_dtype": torch_dtype, "use_safetensors": None if allow_pickle else True, **hub_kwargs(model)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(str(local) if is_local else model, **kwargs)
    except (OSError, ValueError) as err:
        text = str(err)
        if not allow_pickle and "safetensors" in text.lower():
            raise ModelLoadError(
                f"{model!r} has no .safetensors weights for every component; attncontrol reads only safetensors "
                "by default because pickled .bin weights can run code. If you trust this checkpoint, pass "
                f"--allow-pickle (Python: allow_pickle=True). Details: {text}"
            ) from err
        if not is_local:
            raise ModelLoadError(unavailable_message(model, "model", text)) from err
        raise ModelLoadError(f"could not load the pipeline folder {model!r}: {text}") from err
    check_pipeline_tokenizers(pipe, model)
    return pipe.to(device)


def _model_index(model: str) -> dict:
    import json

    local = Path(model).expanduser()
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            kind = "a folder" if local.is_dir() else "a file"
            raise ModelLoadError(f"{model!r} is {kind}, not a diffusers pipeline folder (no model_index.json)")
        return json.loads(index.read_text(encoding="utf-8"))
    if not is_hub_id(model):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model, "model_index.json", **hub_kwargs(model))).read_text())
    except Exception as err:  # any hub error (offline, no such repo, no access) gets the one message
        raise ModelLoadError(unavailable_message(model, "model", str(err))) from err


def load_token_streams(model: str) -> list[tuple[str, int, object]]:
    """The tokenizers a user picks subjects with, without loading the model: ``(label, first map position,
    tokenizer)`` per text stream of the pipeline's family (SD: CLIP; SD3: CLIP then T5 from position 77; FLUX:
    T5), each checked for a real vocabulary."""
    from transformers import AutoTokenizer

    from .models import adapter_class

    index = _model_index(model)
    family = adapter_class(str(index.get("_class_name", "")))
    streams = family.token_streams if family is not None else (("tokenizer", "CLIP", 0),)
    local = Path(model).expanduser()
    out = []
    for subfolder, label, offset in streams:
        if subfolder not in index:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else model, subfolder=subfolder,
                                                **hub_kwargs(model))  # fmt: skip
        except (OSError, ValueError) as err:
            if local.exists():
                raise ModelLoadError(f"could not load the {subfolder} of {model!r}: {err}") from err
            raise ModelLoadError(unavailable_message(model, "tokenizer", str(err))) from err
        out.append((label, offset, check_tokenizer(tok, model, subfolder.replace("_", " "))))
    if not out:
        raise ModelLoadError(f"{model!r} has no tokenizer: is it a text-to-image pipeline?")
    return out
