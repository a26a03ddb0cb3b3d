"""The shipped shapes model: what ships, that it loads by name with no network, that it draws what it is asked
(scored by the shapes detector, which tests/test_shapes_world.py checks against the renderer's truth), and that
Attend-and-Excite raises both-present over plain sampling by the margin the full benchmark measured.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import attncontrol
from attncontrol.cli import main
from attncontrol.shapes import model_dir, score, world

FORBIDDEN = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@pytest.fixture(scope="module")
def shapes_pipe():
    from attncontrol.loading import load_pipeline

    pipe = load_pipeline("shapes", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_small_safetensors_with_a_card():
    folder = model_dir()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert not [p for p in files if p.suffix in FORBIDDEN]
    weights = {p.parent.name for p in files if p.suffix == ".safetensors"}
    assert weights == {"unet", "vae", "text_encoder"}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    card = (folder / "README.md").read_text()
    for must in ("python -m attncontrol.shapes train", "held out", "benchmarks/shapes_quality.py"):
        assert must in card
    recipe = json.loads((folder / "training.json").read_text())
    assert recipe["seconds"] <= 3600  # trained within the hour on the project's 2-core CPU


def test_loads_by_name_offline_as_a_stock_pipeline(shapes_pipe, monkeypatch):
    from diffusers import StableDiffusionPipeline

    assert type(shapes_pipe) is StableDiffusionPipeline
    tok = shapes_pipe.tokenizer
    for word in world.vocabulary():  # every word of the world is one CLIP token with its end-of-word marker
        assert tok.tokenize(word) == [word + "</w>"]
    assert shapes_pipe.vae_scale_factor * shapes_pipe.unet.config.sample_size == world.SIZE


def _generate(pipe, prompt, controls, seed, steps):
    return attncontrol.generate(
        pipe, prompt, controls, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)
    ).images[0]


@pytest.mark.slow
def test_plain_model_draws_each_single_object(shapes_pipe):
    """Each of the 12 objects alone, 2 seeds, 25 steps: the detector finds it in its colour in at least 20 of 24
    images (MEASURED below)."""
    hits = 0
    for colour, shape in world.all_objects():
        for seed in (0, 1):
            found = score.detect(_generate(shapes_pipe, f"a {colour} {shape}", [], seed, 25))
            hits += score.best(found, shape, colour) is not None
    assert hits >= 20, hits


@pytest.mark.slow
def test_attend_and_excite_raises_both_present(shapes_pipe):
    """The first 12 prompts of `shapes-two` x seeds 0 and 1 at 50 steps, plain and Attend-and-Excite at 16x16 maps:
    24 of the benchmark's own images (docs/benchmarks.md, "Quality on the shapes model"). There A&E found both
    shapes in 2 more of these 24 than plain sampling (+4 of all 48, +0.083, 95% interval [0, +0.19], p = 0.21: not
    significant). The margin, 1 image, is half the measured 2: a regression guard on these fixed images, not a
    claim that A&E helps this model in general. At the default 8x8 maps A&E gained nothing (see the docs)."""
    from attncontrol.batch import prompt_set

    plain = excite = 0
    for entry in prompt_set("shapes-two")[:12]:
        for seed in (0, 1):
            for controls in ([], [attncontrol.AttendExcite(subjects=entry.subjects, attn_res=16)]):
                found = score.detect(_generate(shapes_pipe, entry.prompt, controls, seed, 50))
                ok = score.score(found, entry.metadata)["present"]
                excite, plain = (excite + ok, plain) if controls else (excite, plain + ok)
    assert excite - plain >= 1, (plain, excite)


@pytest.mark.slow
def test_readme_first_command_draws_offline(tmp_path, monkeypatch):
    """The README's first command (its `attncontrol generate ...` part, as written there), offline: a real picture
    (the detector finds objects of the world in it; whether both shapes are there is up to the model, whose
    both-present rate is 73%) and the side-by-side."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[0].strip()
    assert first.startswith("python3 -m venv .venv") and "pip install ." in first
    argv = shlex.split(first.split("&& attncontrol ", 1)[1])
    assert argv[0] == "generate" and "--model" in argv and argv[argv.index("--model") + 1] == "shapes"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    with Image.open(tmp_path / "shapes.png") as img, Image.open(tmp_path / "shapes-vs-plain.png") as pair:
        assert img.size == (64, 64)
        assert pair.size == (2 * 256 + 4, 256 + 18)
        found = score.detect(img.convert("RGB"))
    assert found and {f.colour for f in found} & {"red", "blue"}, found
