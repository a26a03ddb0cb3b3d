"""Loading pipelines from a hub id or a local folder, with clear errors offline; safetensors only by default."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import ModelLoadError
from .hub import check_pipeline_tokenizers, hub_kwargs, is_hub_id, unavailable_message

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
