"""The shapes world: a tiny text-to-image model that really draws, shipped in the package, and a scorer for it.

- :mod:`.world`: the seeded renderer (64x64 scenes of coloured circles, squares and triangles) and its captions;
- :mod:`.score`: a deterministic detector (colour segmentation + shape geometry, no learned weights) and the
  scores of an image against its prompt;
- :mod:`.prompts`: the built-in prompt set (``attncontrol batch --prompt-set shapes``);
- :mod:`.train`: the training recipe (``python -m attncontrol.shapes train --out DIR``).

``attncontrol.load_pipeline("shapes")`` and ``--model shapes`` load the shipped model (a stock
``StableDiffusionPipeline`` folder, :func:`model_dir`) with no network. The name ``shapes`` always means the shipped
model; a local folder of that name is ``./shapes``.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "shapes"


def model_dir() -> Path:
    """The shipped shapes pipeline folder (inside the installed package)."""
    return Path(__file__).resolve().parent / "model"


def resolve_model(model):
    """``"shapes"`` -> the shipped folder (as a str); anything else unchanged."""
    if isinstance(model, str) and model == MODEL_NAME:
        return str(model_dir())
    return model
