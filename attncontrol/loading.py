"""Loading pipelines from a hub id or a local folder, with clear errors offline; safetensors only by default."""

from __future__ import annotations

import warnings
from pathlib import Path

from ._lazy import torch
from .errors import ModelLoadError, OptionError
from .hub import check_pipeline_tokenizers, check_tokenizer, hub_kwargs, is_hub_id, unavailable_message

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16"}  # fmt: skip


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str):
    """``None`` = fp16 on CUDA, fp32 elsewhere."""
    if dtype is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    name = DTYPE_NAMES.get(str(dtype).lower())
    if name is None:
        raise OptionError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    return getattr(torch, name)


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
    if is_local:
        check_pipeline_folder(model)
    elif not is_hub_id(model):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    kwargs = {"torch_dtype": torch_dtype, "use_safetensors": None if allow_pickle else True, **hub_kwargs(model)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(str(local) if is_local else model, **kwargs)
    except Exception as err:  # diffusers raises OSError, ValueError, SafetensorError, EnvironmentError, ...
        raise _load_error(model, err, is_local, allow_pickle) from err
    check_pipeline_tokenizers(pipe, model)
    return pipe.to(device)


_DAMAGED = ("header too large", "incomplete", "deserializ", "invalid header", "unexpected end", "truncat")


def _load_error(model: str, err: Exception, is_local: bool, allow_pickle: bool) -> ModelLoadError:
    text = str(err)
    lower = text.lower()
    if "safetensor" in type(err).__name__.lower() or any(k in lower for k in _DAMAGED):
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        return ModelLoadError(  # one line: the CLI prints only an error's first line
            f"a weights file of {model!r} is damaged (a truncated or interrupted download?); download the model "
            f"again (e.g. `hf download <model id> --local-dir <folder>`). Details: {first}"
        )
    if not allow_pickle and "safetensors" in lower:
        return ModelLoadError(
            f"{model!r} has no .safetensors weights for every component; attncontrol reads only safetensors "
            "by default because pickled .bin weights can run code. If you trust this checkpoint, pass "
            f"--allow-pickle (Python: allow_pickle=True). Details: {text}"
        )
    if not is_local:
        return ModelLoadError(unavailable_message(model, "model", text))
    return ModelLoadError(f"could not load the pipeline folder {model!r}: {text}")


def check_pipeline_folder(model: str) -> dict:
    """A local pipeline folder's ``model_index.json``, checked: it exists, and diffusers knows its class."""
    import json

    local = Path(model).expanduser()
    if local.is_file():
        raise ModelLoadError(f"{model!r} is a file, not a diffusers pipeline folder (pass the folder that holds "
                             "model_index.json)")  # fmt: skip
    index = local / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{model!r} is a folder but not a diffusers pipeline (no model_index.json); pass a folder saved "
            "with `pipe.save_pretrained(...)` or downloaded with `hf download <model id> --local-dir <folder>`"
        )
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{index} is not valid JSON: {err}") from None
    name = str(config.get("_class_name", ""))
    import diffusers

    if not hasattr(diffusers, name):
        raise ModelLoadError(f"{index} names the pipeline class {name!r}, which diffusers "
                             f"{diffusers.__version__} does not have")  # fmt: skip
    return config


def _model_index(model: str) -> dict:
    import json

    local = Path(model).expanduser()
    if local.exists():
        return check_pipeline_folder(model)
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
