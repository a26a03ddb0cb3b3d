"""The README's Python example runs (on a tiny local model instead of the hub id, on the CPU)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(tiny_dirs, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in code  # the real model id is what users see
    code = (
        code.replace('"stable-diffusion-v1-5/stable-diffusion-v1-5"', repr(str(tiny_dirs["sd1"])))
        .replace('.to("cuda")', '.to("cpu")')
        .replace('torch.Generator("cuda")', "torch.Generator()")
        .replace("torch.float16", "torch.float32")
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "cat_frog.png").is_file()
    assert namespace["out"].guided_steps  # the example really guided


@pytest.mark.slow
def test_readme_sdxl_example_runs(tiny_dirs, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    code = next(b for b in blocks if "StableDiffusionXLPipeline" in b)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in code
    code = (
        code.replace('"stabilityai/stable-diffusion-xl-base-1.0"', repr(str(tiny_dirs["sdxl"])))
        .replace('.to("cuda")', '.to("cpu")')
        .replace("torch.float16", "torch.float32")
        .replace('"a cat and a frog", [', '"a cat and a frog", num_inference_steps=4, controls=[')
    )
    namespace = {}
    exec("import torch\nimport attncontrol\n" + code, namespace)
    assert len(namespace["out"].guided_steps) == 4


def test_readme_methods_example_runs(sd1):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    code = next(b for b in blocks if "attncontrol.Refocus(" in b)
    code = code.replace('"a cat and a dog", controls,', '"a cat and a dog", controls, num_inference_steps=4,')
    namespace = {"pipe": sd1}
    exec("import torch\nimport attncontrol\n" + code, namespace)
    assert set(namespace["out"].trace[0].losses) == {"attend-excite", "refocus"}


@pytest.mark.slow
def test_readme_attention_example_runs(sd1, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    code = next(b for b in blocks if "attention=True" in b)
    code = code.replace("attention=True,", "attention=True, num_inference_steps=12,")
    monkeypatch.chdir(tmp_path)
    namespace = {"pipe": sd1}
    exec("import torch\nimport attncontrol\n" + code, namespace)
    assert (tmp_path / "frog_heat.png").is_file() and (tmp_path / "cat_attention.gif").is_file()
    assert set(namespace["att"].metrics()) == {"min_subject_attention", "subject_overlap"}


def test_readme_option_tables_are_the_fields_metadata():
    """The README's option tables are generated from the fields (help, range, default, aliases): a changed default
    or range without `attncontrol methods --markdown` pasted into the README fails here."""
    from attncontrol.controls import METHODS
    from attncontrol.controls.common import GuidanceOptions
    from attncontrol.controls.options import options_markdown

    text = README.read_text()
    block = text.split("<!-- options:begin -->\n", 1)[1].split("\n<!-- options:end -->", 1)[0]
    assert block == options_markdown(METHODS, GuidanceOptions)


def test_readme_regions_example_runs(sd1):
    """The Regional prompting section's Python example, on the tiny model: a regions run that differs from the
    plain one with the same seed."""
    import numpy as np
    import torch

    import attncontrol

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    code = next(b for b in blocks if "attncontrol.Regions(" in b)
    code = code.replace("[regions],", "[regions], num_inference_steps=3,")
    namespace = {"pipe": sd1}
    exec("import torch\nimport attncontrol\n" + code, namespace)
    regions = namespace["regions"]
    assert regions.extra_text() == ("a red car", "a brown dog") and regions.base_prompt_weight == 0.3
    plain = attncontrol.generate(
        sd1, "a car and a dog in a park", [], num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(namespace["out"].images[0]))


def test_readme_modular_examples_run(tmp_path, monkeypatch):
    """The Modular Diffusers section's examples, on the tiny models: the hub id and the device left out, the
    components set from a tiny pipeline instead of downloaded; each saves its image, and the saved block loads."""
    import warnings

    from attncontrol.testing import make_tiny_pipeline

    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    examples = [b for b in blocks if "attncontrol.modular" in b]
    assert len(examples) == 2, "the section has an SDXL and a FLUX example"
    for code, family in zip(examples, ("sdxl", "flux")):
        tiny = make_tiny_pipeline(family)
        code = re.sub(r'init_pipeline\("[^"]+"\)', "init_pipeline()", code)
        code = re.sub(r"pipe.load_components\([^)]*\)", "pipe.update_components(**tiny_parts)", code)
        code = code.replace('pipe.to("cuda")', "").replace('"cuda"', '"cpu"')
        code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2, height=64, width=64", code)
        parts = {k: v for k, v in tiny.components.items() if v is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(code, "README.md", "exec"), {"tiny_parts": parts})
    assert (tmp_path / "cat_frog_modular.png").is_file() and (tmp_path / "car_dog_modular.png").is_file()
    assert (tmp_path / "dog_heat.png").is_file()
    save = next(b for b in blocks if "save_pretrained(" in b and "AttnControl" in b)
    namespace: dict = {}
    exec("import attncontrol\nfrom attncontrol.modular import AttnControl\n" + save, namespace)
    assert namespace["block"].controls == [namespace["attncontrol"].AttendExcite(subjects=["cat", "frog"])]
