"""Save and load an :class:`AttnControl` block as a Modular Diffusers custom-block folder.

The folder is what diffusers' ``ModularPipelineBlocks.save_pretrained`` writes for a custom block, so
``ModularPipelineBlocks.from_pretrained(folder, trust_remote_code=True)`` loads it like any other::

    folder/
      modular_config.json   # the block's config: the controls as JSON data (attncontrol.controls.data), attention,
                            # checkpointing, auto_map -> attncontrol_block.AttnControlBlock, requirements
      attncontrol_block.py  # generated: AttnControl of the installed attncontrol with that config; nothing else

diffusers treats every such folder as remote code. :func:`load_block` (``AttnControl.from_pretrained``) needs no
trust for a folder whose only code is exactly the module this version generates for its config: it then runs
none of the folder's code and builds the block from the installed package and the JSON
(:meth:`AttnControl.from_pretrained`, :func:`attncontrol.modular.load_block`). Any other folder (an
edited module, another class, more Python files) is refused unless ``trust_remote_code=True``, which hands it to
diffusers' own loader (which also honours ``DIFFUSERS_DISABLE_REMOTE_CODE``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import OptionError
from ..io import atomic_write_bytes

MODULE, CLASS = "attncontrol_block", "AttnControlBlock"
CONFIG_NAME = "modular_config.json"
AUTO_MAP = {"ModularPipelineBlocks": f"{MODULE}.{CLASS}"}
OWN_KEYS = ("controls", "attention", "checkpointing")


class UntrustedBlockError(OptionError):
    """A block folder holds code attncontrol did not generate; loading it would run that code."""


def module_text(config: dict[str, Any]) -> str:
    """The module saved beside ``config``: the installed AttnControl with these settings, and nothing else."""
    settings = json.dumps({k: config[k] for k in OWN_KEYS}, sort_keys=True)
    return (
        '"""Written by attncontrol.modular.save_block: the installed attncontrol\'s AttnControl block with the\n'
        'settings below (the same as modular_config.json). It holds no other code."""\n\n'
        "import json\n\n"
        "from attncontrol.modular import AttnControl\n\n"
        f"SETTINGS = json.loads({settings!r})\n\n\n"
        f"class {CLASS}(AttnControl):\n"
        "    def __init__(self, controls=None, attention=None, checkpointing=None):\n"
        "        super().__init__(\n"
        '            SETTINGS["controls"] if controls is None else controls,\n'
        '            SETTINGS["attention"] if attention is None else attention,\n'
        '            SETTINGS["checkpointing"] if checkpointing is None else checkpointing,\n'
        "        )\n"
    )


def write_folder(settings: dict[str, Any], folder) -> Path:
    """Write a block folder for ``settings`` (``controls`` as JSON data, ``attention``, ``checkpointing``): the
    config and the module; each file is written whole or not at all. Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OptionError(f"{folder} exists and is not a folder")
    config = {
        "_class_name": CLASS,
        "_diffusers_version": _diffusers_version(),
        **{k: settings[k] for k in OWN_KEYS},
        "auto_map": AUTO_MAP,
        "requirements": {"attncontrol": f">={__version__}"},
    }
    text = module_text(config)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / f"{MODULE}.py", lambda fh: fh.write(text.encode("utf-8")))
    payload = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(folder / CONFIG_NAME, lambda fh: fh.write(payload.encode("utf-8")))
    return folder


def read_folder(path) -> tuple[dict[str, Any] | None, str | None]:
    """``(settings, None)`` for a folder exactly as :func:`write_folder` writes it (no code of it is run), else
    ``(None, what differs)``."""
    folder = Path(path)
    why = _why_not_ours(folder)
    if why is not None:
        return None, why
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    return {k: config[k] for k in OWN_KEYS}, None


def _why_not_ours(folder: Path) -> str | None:
    """None when ``folder`` is exactly what save_block writes; else what differs."""
    if not folder.is_dir():
        return "not a local folder (a Hub block is remote code)"
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        return f"no {CONFIG_NAME}"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{CONFIG_NAME} is not JSON ({err})"
    if not isinstance(config, dict) or config.get("auto_map") != AUTO_MAP:
        return f"its auto_map is {config.get('auto_map') if isinstance(config, dict) else None!r}, not attncontrol's"
    missing = [k for k in OWN_KEYS if k not in config]
    if missing:
        return f"{CONFIG_NAME} has no {', '.join(missing)}"
    code = sorted(p.name for p in folder.rglob("*.py"))
    if code != [f"{MODULE}.py"]:
        return f"it holds Python files {code}, not only {MODULE}.py"
    if (folder / f"{MODULE}.py").read_text(encoding="utf-8") != module_text(config):
        return f"{MODULE}.py is not the module attncontrol writes for this config (edited, or another version)"
    return None


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
