"""Loading the scorers' pretrained models (CLIP, a captioner, BLIP VQA, a detector) from a local folder in
transformers' layout or a hub id, with one-line errors. Both ``attncontrol.eval`` and :mod:`.models` load through
here, so neither needs the other."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError


def load_pretrained(cls, path: str, what: str, flag: str | None = None, **kwargs):
    """A transformers model or processor from a local folder or a hub id (fails fast offline); a processor's
    tokenizer is checked for a real vocabulary."""
    from ..hub import check_tokenizer, hub_kwargs, is_hub_id, unavailable_message

    local = Path(path).expanduser()
    if not local.is_dir() and not is_hub_id(path):
        raise ModelLoadError(
            f"the {what} folder {path!r} does not exist; pass a local folder holding the model in transformers' "
            "save_pretrained layout (docs/evaluation.md names the models to download)"
        )
    try:
        loaded = cls.from_pretrained(str(local) if local.is_dir() else path, **kwargs, **hub_kwargs(path))
    except (OSError, ValueError) as err:
        if not local.is_dir():
            flag = flag or ("--captioner" if what.startswith("captioner") else "--clip")
            raise ModelLoadError(unavailable_message(path, what, str(err), flag)) from err
        hint = "a local folder (save_pretrained layout, safetensors weights)"
        raise ModelLoadError(f"could not load the {what} from {path!r}: {err}\nPass {hint}.") from err
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is not None:
        check_tokenizer(tokenizer, path, f"{what}'s tokenizer")
    return loaded
