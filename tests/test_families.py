"""Every family, the same way: what the CLI checks before torch (token streams, templates, the size multiple)
agrees with what the family's adapter does once the model is loaded, and the README has a row and a runnable
example per family."""

from pathlib import Path

import pytest

from attncontrol.loading import PATCH_SIZE, STREAM_TEMPLATES, TOKEN_STREAMS, size_multiple
from attncontrol.models import ADAPTERS, get_adapter
from attncontrol.testing import FAMILIES, make_tiny_pipeline

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module", params=FAMILIES)
def family_pipe(request):
    return request.param, make_tiny_pipeline(request.param, seed=0)


def test_every_adapter_has_its_token_streams_before_torch():
    for adapter in ADAPTERS:
        assert adapter.pipeline_names, adapter.__name__
        for name in adapter.pipeline_names:
            assert TOKEN_STREAMS[name] == adapter.token_streams, name
    assert set(STREAM_TEMPLATES) <= set(TOKEN_STREAMS) and set(PATCH_SIZE) <= set(TOKEN_STREAMS)


def test_the_regions_refusal_before_torch_is_the_adapters(family_pipe):
    """The CLI refuses --region from the model folder's class name alone (loading.REGIONS_UNSUPPORTED); the adapter
    refuses it once loaded (ModelAdapter.regions_unsupported). The two agree for every family."""
    from attncontrol.loading import REGIONS_UNSUPPORTED

    family, pipe = family_pipe
    refused = get_adapter(pipe).regions_unsupported() is not None
    assert refused == (type(pipe).__name__ in REGIONS_UNSUPPORTED), family


def test_the_size_checked_before_torch_is_the_adapters(family_pipe):
    """The CLI refuses sizes from the model folder's JSON alone (loading.size_multiple); the adapter refuses them
    once loaded (ModelAdapter.size_multiple). A family whose patch or VAE factor the JSON rule misreads fails."""
    family, pipe = family_pipe
    index = {"_class_name": type(pipe).__name__}
    assert size_multiple(index, dict(pipe.vae.config)) == get_adapter(pipe).size_multiple, family


def test_the_template_checked_before_torch_is_the_adapters(family_pipe):
    """A subject's positions from the CLI's templated stream (no model) equal the adapter's (the loaded pipeline)."""
    from attncontrol.loading import TOKEN_STREAMS as streams
    from attncontrol.tokens import tokenize

    family, pipe = family_pipe
    adapter = get_adapter(pipe)
    prompt = "A Cat and a DOG"  # cased: PixArt and SANA lower-case it, the others keep it
    layout = adapter.text_layout([prompt], {})
    for (subfolder, _, offset), segment in zip(streams[type(pipe).__name__], layout.segments):
        tokenizer = getattr(pipe, subfolder)
        template = STREAM_TEMPLATES.get(type(pipe).__name__, {}).get(subfolder)
        before = tokenize(tokenizer if template is None else template.wrap(tokenizer), prompt)
        after = segment.table(0)
        assert after is not None and offset == segment.offset, family
        assert (before.ids, before.prefix, before.suffix) == (after.ids, after.prefix, after.suffix), family


# the new families and the hub id of each one's README command
HUB_IDS = {
    "flux2": "black-forest-labs/FLUX.2-dev",
    "klein": "black-forest-labs/FLUX.2-klein-4B",
    "qwenimage": "Qwen/Qwen-Image",
    "zimage": "Tongyi-MAI/Z-Image-Turbo",
    "pixart": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
    "sana": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
}
NEW = [f for f in FAMILIES if f in HUB_IDS]


def _readme_command(family: str, folder, steps: int, out) -> list[str]:
    """The README's command for ``family`` with the tiny folder for its hub id, fewer steps and ``out``."""
    import shlex

    lines = [line for line in README.read_text().splitlines() if f"--model {HUB_IDS[family]} " in line]
    assert len(lines) == 1, f"the README has {len(lines)} commands for {family}"
    words = shlex.split(lines[0])
    assert words[:2] == ["attncontrol", "generate"]
    words = words[1:]
    words[words.index("--model") + 1] = str(folder)
    words[words.index("--out") + 1] = str(out)
    if "--steps" in words:
        words[words.index("--steps") + 1] = str(steps)
    else:
        words += ["--steps", str(steps)]
    return words


def test_every_family_has_a_readme_row_and_command():
    text = README.read_text()
    for family, hub_id in HUB_IDS.items():
        assert family in NEW and text.count(f"--model {hub_id} ") == 1, family
    for adapter in ADAPTERS:
        for name in adapter.pipeline_names:
            assert f"| `{name}` |" in text, f"no row of a families table names {name}"


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW)
def test_the_front_ends_take_the_familys_folder(family, tmp_path, capsys):
    """A saved tiny folder of the family through the batch command, eval's attention metrics, generate's heatmaps
    and the app's runner: each front end takes the family with no family-specific code of its own."""
    import json
    import warnings

    from diffusers import DiffusionPipeline

    from attncontrol.cli import main
    from attncontrol.testing import save_tiny_pipeline
    from attncontrol.ui.logic import Runner, build_request

    folder = save_tiny_pipeline(tmp_path / family, family=family, seed=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat and a dog | cat, dog\n")
    out = tmp_path / "batch"
    common = ["--model", str(folder), "--steps", "2"]
    assert (
        main(["batch", str(prompts), "--out", str(out), "--seeds", "0", "--methods", "none,attend-excite", *common])
        == 0
    )
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"none", "attend-excite"}
    assert main(["eval", str(out)]) == 0
    assert "min_subject_attention" in capsys.readouterr().out
    maps = tmp_path / "maps"
    readme = _readme_command(family, folder, 2, tmp_path / "x.png")  # the README's example for this family
    assert main([*readme, "--save-attention", str(maps)]) == 0
    assert (tmp_path / "x.png").is_file() and sorted(p.suffix for p in maps.iterdir()).count(".png") >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    runner = Runner(pipe, family)
    height, width = runner.native_size()
    guidance = runner.default_guidance()
    request = build_request("a cat and a dog", ["cat", "dog"], ["attend-excite"], None, 0, 2, guidance, height, width)
    result = runner.run(request)
    assert result.heatmaps and result.curves


@pytest.mark.parametrize("family", ["sana", "zimage"])
def test_half_precision_without_controls_is_the_stock_pipeline(family):
    """These pipelines sample in float32 whatever the model's dtype (ModelAdapter.latent_dtype): in bfloat16 the
    run's noise and latents must still be the pipeline's, bit for bit."""
    import torch

    from attncontrol import generate

    from .conftest import seeded

    pipe = make_tiny_pipeline(family, seed=2).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="latent", guidance_scale=1.0)
    if family == "sana":
        kw.update(height=256, width=256)
    stock = pipe(prompt="a cat and a dog", generator=seeded(0), **kw).images
    ours = generate(pipe, "a cat and a dog", [], generator=seeded(0), **kw).images
    assert stock.dtype == ours.dtype and torch.equal(ours, stock)
