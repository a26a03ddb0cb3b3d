"""Loading pipelines from a hub id or a local folder, with clear errors offline; safetensors only by default."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ._lazy import torch
from .errors import ModelLoadError, OptionError
from .hub import check_pipeline_tokenizers, check_tokenizer, hub_kwargs, is_hub_id, unavailable_message
from .shapes import resolve_model
from .tokens import PromptTemplate, TailWindow, user_message

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


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


def check_device(device, where: str = "device") -> str | None:
    """``None`` (the default: cuda if available), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (a str or a
    ``torch.device``), and present on this machine; an :class:`OptionError` naming ``where`` otherwise."""
    if device is None:
        return None
    if type(device).__name__ == "device" and type(device).__module__ == "torch":
        device = str(device)
    if not isinstance(device, str):
        raise OptionError(f"{where} must be cpu, cuda, cuda:N or mps, got {device!r}")
    name, _, index = device.partition(":")
    if name not in ("cpu", "cuda", "mps") or (index and (name != "cuda" or not index.isdigit())):
        raise OptionError(f"{where} must be cpu, cuda, cuda:N or mps, got {device!r}")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{where} {device}: this machine has no CUDA device (or this torch has no CUDA support)")
        if index and int(index) >= torch.cuda.device_count():
            raise OptionError(f"{where} {device}: there are {torch.cuda.device_count()} CUDA devices")
    if name == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"{where} mps: MPS is not available on this machine")
    return device


def load_pipeline(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
):
    """Load a diffusers text-to-image pipeline from a hub id or a local folder (diffusers layout).

    Only ``.safetensors`` weights are read unless ``allow_pickle=True`` (pickled ``.bin`` files can run code).
    ``"shapes"`` is the shipped shapes-world model (:mod:`attncontrol.shapes`), offline.
    """
    model = resolve_model(model)
    device = check_device(device) or default_device()
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    local = Path(model).expanduser()
    is_local = local.exists()
    if is_local:
        check_pipeline_folder(model)
    elif not is_hub_id(model):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    from diffusers import DiffusionPipeline

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
    if isinstance(err, KeyError) or not text:  # a bare key or nothing: say what it was
        text = f"{type(err).__name__} {text}".strip()
    return ModelLoadError(f"could not load the pipeline folder {model!r}: {text}")


# The text streams a user picks subjects in, per pipeline class: (subfolder, label, first map position). The
# family adapters (attncontrol.models) use the same table; it lives here so that subjects are checked before torch
# and diffusers are imported.
TOKEN_STREAMS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "StableDiffusionPipeline": (("tokenizer", "CLIP", 0),),
    "StableDiffusionXLPipeline": (("tokenizer", "CLIP", 0),),
    "StableDiffusion3Pipeline": (("tokenizer", "CLIP", 0), ("tokenizer_3", "T5", 77)),
    "FluxPipeline": (("tokenizer_2", "T5", 0),),
    "PixArtSigmaPipeline": (("tokenizer", "T5", 0),),
    "QwenImagePipeline": (("tokenizer", "Qwen2.5-VL", 0),),
    "ZImagePipeline": (("tokenizer", "Qwen3", 0),),
    "Flux2Pipeline": (("tokenizer", "Mistral-3", 0),),
    "Flux2KleinPipeline": (("tokenizer", "Qwen3", 0),),
    "SanaPipeline": (("tokenizer", "Gemma", 0),),
}
# How many latent cells one image token covers per side, per pipeline class (a transformer's patch or the 2x2
# packing of the latents); absent: 1. With the VAE's factor it gives the size multiple checked before torch.
PATCH_SIZE: dict[str, int] = {
    "StableDiffusion3Pipeline": 2,
    "FluxPipeline": 2,
    "PixArtSigmaPipeline": 2,
    "QwenImagePipeline": 2,
    "ZImagePipeline": 2,
    "Flux2Pipeline": 2,
    "Flux2KleinPipeline": 2,
}  # SanaPipeline: patch 1, its DC-AE's factor 32
# Pipeline classes whose adapter refuses regional prompting (``ModelAdapter.regions_unsupported`` says why), so the
# command line refuses ``--region`` before torch loads; tests/test_families.py checks the table against the adapters.
REGIONS_UNSUPPORTED: frozenset[str] = frozenset({"ZImagePipeline"})


def vae_factor(vae_config: dict | None) -> int:
    """The VAE's spatial downsampling, read from its config as each VAE class states it (default 8)."""
    config = vae_config or {}
    for key, levels in (("block_out_channels", -1), ("encoder_block_out_channels", -1), ("temperal_downsample", 0)):
        if isinstance(config.get(key), (list, tuple)) and config[key]:
            return 2 ** (len(config[key]) + levels)
    return 8


def size_multiple(index: dict, vae_config: dict | None) -> int:
    """Heights and widths must be multiples of this: the VAE's factor times the family's patch (at least 8)."""
    return max(8, vae_factor(vae_config) * PATCH_SIZE.get(str(index.get("_class_name", "")), 1))


# QwenImagePipeline.prompt_template_encode (diffusers' pipeline_qwenimage.py:QwenImagePipeline.__init__), copied so
# that token tables need no torch; tests/test_family_qwenimage.py checks it equals the pipeline's attribute.
QWENIMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def system_then_user(prompt: str, system_message: str | None = None) -> list[dict[str, Any]]:
    """FLUX.2 [dev]'s chat (diffusers ``pipeline_flux2.py:format_input``): a system turn holding diffusers'
    ``SYSTEM_MESSAGE`` (or ``system_message``: the pipeline's own ``system_message`` attribute), then a user turn
    holding the prompt without ``[IMG]``, each content a list of text parts. Imported lazily: diffusers imports
    torch, and token tables are built before it."""
    if system_message is None:
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        system_message = SYSTEM_MESSAGE
    return [
        {"role": "system", "content": [{"type": "text", "text": system_message}]},
        {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
    ]


# The pipelines that render the prompt into a template before their (LLM) text encoder: pipeline class ->
# tokenizer subfolder -> the template (attncontrol.tokens.PromptTemplate), so that token tables, subject checks and
# the family adapters read the positions the denoiser attends to.
STREAM_TEMPLATES: dict[str, dict[str, PromptTemplate]] = {
    # PixArtSigmaPipeline._text_preprocessing: the prompt lower-cased and stripped (without clean_caption)
    "PixArtSigmaPipeline": {"tokenizer": PromptTemplate(lower=True)},
    "QwenImagePipeline": {"tokenizer": PromptTemplate(pattern=QWENIMAGE_PROMPT_TEMPLATE, drop=34)},
    # ZImagePipeline._encode_prompt: one user turn, the assistant's turn opened, thinking on (no empty think block)
    "ZImagePipeline": {
        "tokenizer": PromptTemplate(
            messages=user_message, chat_kwargs=(("add_generation_prompt", True), ("enable_thinking", True))
        )
    },
    # pipeline_flux2.py:_get_mistral_3_small_prompt_embeds: apply_chat_template(tokenize=True), which adds no
    # special tokens of its own (the template writes <s>); padded to max_sequence_length, nothing dropped
    "Flux2Pipeline": {"tokenizer": PromptTemplate(messages=system_then_user, special=False)},
    # pipeline_flux2_klein.py:_get_qwen3_prompt_embeds: the rendered chat (generation prompt opened, thinking off)
    # tokenised with the tokenizer's defaults, padded to max_sequence_length, nothing dropped
    "Flux2KleinPipeline": {
        "tokenizer": PromptTemplate(
            messages=user_message, chat_kwargs=(("add_generation_prompt", True), ("enable_thinking", False))
        )
    },
}


def instruction_template(instruction: list[str] | None, max_sequence_length: int) -> PromptTemplate:
    """The template of a pipeline that lowercases the prompt, puts its instruction lines (joined by newlines)
    before it, pads the ids to the instruction's token count + ``max_sequence_length`` - 2 and keeps the first
    (BOS) and the last ``max_sequence_length`` - 1 (diffusers ``pipeline_sana.py``:
    ``SanaPipeline._get_gemma_prompt_embeds`` and ``encode_prompt``'s ``select_index``). Without an instruction:
    the prompt alone, its first ``max_sequence_length`` ids."""
    if not instruction:
        return PromptTemplate(lower=True)
    text = "\n".join(instruction)
    window = TailWindow(head=1, length=max_sequence_length, reference=text, extra=max_sequence_length - 2)
    return PromptTemplate(text.replace("{", "{{").replace("}", "}}") + "{}", window=window, lower=True)


def call_default(path: tuple[str, ...], cls: str, name: str) -> Any:
    """The default of ``name`` in ``cls.__call__`` of diffusers' module file ``path``, read from its source
    without importing diffusers (or torch); None where it cannot be read."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("diffusers")
    if spec is None or spec.origin is None:
        return None
    try:
        tree = ast.parse(Path(spec.origin).parent.joinpath(*path).read_text(encoding="utf-8"))
        klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        call = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == "__call__")
        args = call.args.args[len(call.args.args) - len(call.args.defaults) :]
        default = next(d for a, d in zip(args, call.args.defaults) if a.arg == name)
        return ast.literal_eval(default)
    except (OSError, StopIteration, ValueError, SyntaxError):
        return None


_SANA_FILE = ("pipelines", "sana", "pipeline_sana.py")
_SANA_INSTRUCTION = call_default(_SANA_FILE, "SanaPipeline", "complex_human_instruction")
_SANA_LENGTH = call_default(_SANA_FILE, "SanaPipeline", "max_sequence_length")
if _SANA_INSTRUCTION is not None and isinstance(_SANA_LENGTH, int):  # the pipeline's defaults (300 tokens)
    STREAM_TEMPLATES["SanaPipeline"] = {"tokenizer": instruction_template(_SANA_INSTRUCTION, _SANA_LENGTH)}


def check_pipeline_folder(model: str, check_class: bool = True) -> dict:
    """A local pipeline folder's ``model_index.json``, checked: it exists, every component it lists has its
    folder, and diffusers knows its class (``check_class``; a class of :data:`TOKEN_STREAMS` needs no diffusers
    import to be known)."""
    import json

    local = Path(model).expanduser()
    if local.is_file():
        raise ModelLoadError(
            f"{model!r} is a file, not a diffusers pipeline folder (pass the folder that holds model_index.json)"
        )
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
    if not isinstance(config, dict):
        raise ModelLoadError(f"{index} is not a diffusers model index (a JSON object)")
    for component, value in config.items():
        if component.startswith("_") or not isinstance(value, list) or value[:1] == [None] or None in value:
            continue  # a config entry, or a component the pipeline runs without (e.g. no safety checker)
        folder = local / component
        if not folder.is_dir() or not any(folder.iterdir()):
            what = "is empty" if folder.is_dir() else "is missing"
            raise ModelLoadError(
                f"{model!r} is incomplete: its model_index.json lists the component "
                f"{component!r} ({'.'.join(map(str, value))}), but the folder "
                f"{str(folder)!r} {what}; download the model again or copy that folder "
                "in"
            )
    name = str(config.get("_class_name", ""))
    if not check_class and name in TOKEN_STREAMS:
        return config
    import diffusers

    if not hasattr(diffusers, name):
        raise ModelLoadError(
            f"{index} names the pipeline class {name!r}, which diffusers {diffusers.__version__} does not have"
        )
    return config


def model_index(model: str) -> dict:
    """The model's ``model_index.json`` without importing torch or diffusers (for a supported family): from a
    local folder (checked as by :func:`check_pipeline_folder`), or from the Hub or its cache, where an unreachable
    Hub gives the one offline message at once."""
    import json

    model = resolve_model(model)
    local = Path(model).expanduser()
    if local.exists():
        return check_pipeline_folder(model, check_class=False)
    if not is_hub_id(model):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model, "model_index.json", **hub_kwargs(model))).read_text())
    except Exception as err:  # any hub error (offline, no such repo, no access) gets the one message
        raise ModelLoadError(unavailable_message(model, "model", str(err))) from err


def load_token_streams(model: str) -> list[tuple[str, int, Any]]:
    """The tokenizers a user picks subjects with, without loading the model: ``(label, first map position,
    tokenizer)`` per text stream of the pipeline's family (SD: CLIP; SD3: CLIP then T5 from position 77; FLUX:
    T5), each checked for a real vocabulary; a templated stream's tokenizer is wrapped in its template
    (:data:`STREAM_TEMPLATES`), so its positions are the encoder's."""
    model = resolve_model(model)
    index = model_index(model)
    streams = TOKEN_STREAMS.get(str(index.get("_class_name", "")), (("tokenizer", "CLIP", 0),))
    local = Path(model).expanduser()
    out = []
    for subfolder, label, offset in streams:
        if subfolder not in index:
            continue
        try:
            tok = _tokenizer_class(model, subfolder).from_pretrained(
                str(local) if local.exists() else model, subfolder=subfolder, **hub_kwargs(model)
            )
        except Exception as err:  # OSError, ValueError, a KeyError for a tokenizer.json without a section, ...
            if not local.exists():
                raise ModelLoadError(unavailable_message(model, "tokenizer", str(err))) from err
            what = f"its {err.args[0]!r} entry is missing" if isinstance(err, KeyError) and err.args else str(err)
            raise ModelLoadError(
                f"could not load the {subfolder} of {model!r}: {what} ({type(err).__name__}); is "
                f"{str(local / subfolder)!r} complete?"
            ) from err
        tok = check_tokenizer(tok, model, subfolder.replace("_", " "))
        template = STREAM_TEMPLATES.get(str(index.get("_class_name", "")), {}).get(subfolder)
        out.append((label, offset, tok if template is None else template.wrap(tok)))
    if not out:
        raise ModelLoadError(f"{model!r} has no tokenizer: is it a text-to-image pipeline?")
    return out


def _tokenizer_class(model: str, subfolder: str):
    """The tokenizer class the model's ``tokenizer_config.json`` names (e.g. ``CLIPTokenizer``): loading it directly
    does not import torch, which ``AutoTokenizer`` does. Without that name, AutoTokenizer."""
    import json

    import transformers

    try:
        config = Path(model).expanduser() / subfolder / "tokenizer_config.json"
        if is_hub_id(model):
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(model, "tokenizer_config.json", subfolder=subfolder, **hub_kwargs(model)))
        name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except Exception:  # no such file, offline, not JSON: AutoTokenizer decides (and reports)
        name = None
    if isinstance(name, str) and name.isidentifier():
        try:
            return getattr(transformers, name)
        except (AttributeError, ImportError):
            pass
    return transformers.AutoTokenizer
