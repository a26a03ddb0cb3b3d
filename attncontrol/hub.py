"""The Hugging Face Hub: fail fast when it cannot be reached, and never trust a tokenizer without a vocabulary.

Offline rule: when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, or one TCP connection to the Hub's
host (``HF_ENDPOINT``, default huggingface.co) fails within 3 seconds, models named by hub id are loaded with
``local_files_only=True``: from the local cache when they are there, otherwise at once with a message that
names the model and says how to pass a local folder (instead of half a minute of retries).

Tokenizer rule: with transformers 5, ``from_pretrained`` of an unreachable hub id can return a tokenizer with an
empty vocabulary (every word becomes the unknown token, which for CLIP is end-of-text). Every tokenizer the
project loads goes through :func:`check_tokenizer`.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from .errors import ModelLoadError

_TRUE = {"1", "on", "yes", "true"}
# A real vocabulary has more entries than this, and these ordinary words are not the unknown token.
MIN_VOCAB = 16
PROBE_TEXT = "a photo of a cat"


def _env_offline() -> str | None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name} is set"
    return None


@lru_cache(maxsize=4)
def _unreachable(endpoint: str, timeout: float) -> str | None:
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port} cannot be reached ({err.strerror or err})"


def offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be used now (``HF_HUB_OFFLINE`` set, or its host unreachable), or None."""
    reason = _env_offline()
    if reason:
        return reason
    return _unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


def is_hub_id(model: str) -> bool:
    """``org/name`` (or ``name``) that is not an existing path and does not look like one."""
    if Path(model).expanduser().exists():
        return False
    return not model.startswith((".", "/", "~")) and model.count("/") <= 1 and "\\" not in model


def hub_kwargs(model: str) -> dict:
    """``{"local_files_only": True}`` for a hub id while the Hub is unreachable (use the cache, fail fast). Once
    the probe has found the Hub unreachable, huggingface_hub is told it is offline too, so none of its own requests
    (e.g. the user-agent registry it fetches before a download) tries the network again in this process."""
    if not (is_hub_id(model) and offline_reason()):
        return {}
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        pass
    return {"local_files_only": True}


def unavailable_message(model: str, what: str = "model", detail: str | None = None, flag: str = "--model") -> str:
    """The one message for "this hub model cannot be had here": names it and says how to pass a folder."""
    reason = offline_reason()
    why = (
        f"the Hugging Face Hub is not reachable ({reason}) and it is not in the local cache"
        if reason
        else ("it could not be fetched from the Hugging Face Hub (no such model, or no access?)")
    )
    text = (  # one line: the CLI prints only an error's first line
        f"could not load the {what} {model!r}: {why}. "
        f"Download it where the Hub is reachable, e.g. `hf download {model} --local-dir ./my-model`, then pass "
        f"the folder: `{flag} ./my-model`"
        + (
            " (Python: load_pipeline('./my-model')). To try attncontrol with no "
            "download at all, `--model shapes` is a tiny model of coloured shapes shipped in the package."
            if flag == "--model"
            else "."
        )
    )
    return text + (f"\nDetails: {detail}" if detail else "")


def check_tokenizer(tokenizer, model: str, what: str = "tokenizer"):
    """Return ``tokenizer`` if it has a real vocabulary; else raise :class:`ModelLoadError` with the offline
    message (an empty vocabulary is what transformers 5 hands back for an unreachable hub id)."""
    size = len(tokenizer)
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    unk = getattr(tokenizer, "unk_token_id", None)
    if size > MIN_VOCAB and ids and (unk is None or unk not in ids):
        return tokenizer
    problem = f"its {what} has no real vocabulary ({size} entries; {PROBE_TEXT!r} encodes to unknown tokens {ids})"
    if is_hub_id(model):
        raise ModelLoadError(unavailable_message(model, what, problem))
    raise ModelLoadError(
        f"could not load the {what} of {model!r}: {problem}. Is the folder complete (vocabulary files included)?"
    )


def check_pipeline_tokenizers(pipe, model: str):
    """Every tokenizer component of a diffusers pipeline (``tokenizer``, ``tokenizer_2``, ``tokenizer_3``)."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            check_tokenizer(tokenizer, model, name.replace("_", " "))
    return pipe
