"""attncontrol as Modular Diffusers blocks (``attncontrol.modular``), on the tiny models.

What is proven here:
- with controls, the modular pipeline with our blocks makes the image ``attncontrol.generate`` makes, bit for bit,
  on every family whose stock pipeline and stock modular pipeline run the same forwards (FLUX.1, FLUX.2, Klein,
  Qwen-Image, and SDXL, SD3 and Z-Image without CFG); where the stock pipeline batches CFG and the modular guider
  runs two forwards (SDXL, SD3, Z-Image with CFG) the images agree to float32 rounding and the traces match;
- the same trace (one record per step, the same losses), so the guidance really ran, and a modular run with
  controls differs from one without (the equality is not the trivial one);
- with no controls the pipeline is the stock modular one, bit for bit;
- the processors are restored when the loop fails; the run is not copied when a state is passed back;
- a block folder saves, loads offline without running its code, and a folder with any other code is refused
  unless ``trust_remote_code=True`` (which diffusers' own loader then honours).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

pytest.importorskip("diffusers.modular_pipelines")

import diffusers.modular_pipelines as M  # noqa: E402
from diffusers.guiders import ClassifierFreeGuidance  # noqa: E402

import attncontrol as ac  # noqa: E402
from attncontrol.controls import METHODS  # noqa: E402
from attncontrol.controls.data import control_data, control_from_data  # noqa: E402
from attncontrol.errors import OptionError, SubjectError, UnsupportedPipelineError  # noqa: E402
from attncontrol.modular import AttnControl, attach, load_block, save_block  # noqa: E402
from attncontrol.modular.folder import UntrustedBlockError  # noqa: E402
from attncontrol.testing import make_tiny_pipeline  # noqa: E402

PROMPT = "a cat and a dog"
BLOCKS = {
    "sdxl": M.StableDiffusionXLAutoBlocks,
    "sd3": M.StableDiffusion3AutoBlocks,
    "flux": M.FluxAutoBlocks,
    "flux2": M.Flux2AutoBlocks,
    "klein": M.Flux2KleinBaseAutoBlocks,
    "qwenimage": M.QwenImageAutoBlocks,
    "zimage": M.ZImageAutoBlocks,
}
# the stock pipeline's argument that means what the guider's scale means (Z-Image's scale is one less)
STOCK_CFG = {
    "sdxl": lambda s: {"guidance_scale": s},
    "sd3": lambda s: {"guidance_scale": s},
    "klein": lambda s: {"guidance_scale": s},
    "zimage": lambda s: {"guidance_scale": s - 1.0},
    "qwenimage": lambda s: {"true_cfg_scale": s, "negative_prompt": "blurry"} if s > 1 else {"true_cfg_scale": s},
}
BATCHED_CFG = {"sdxl", "sd3", "zimage"}  # stock batches the branches; the modular guider runs them one by one


def AE():
    return [ac.AttendExcite(subjects=["cat", "dog"])]


def REGIONS():
    return [ac.Regions(regions=[("a cat", (0, 0, 0.5, 1)), ("a dog", (0.5, 0, 1, 1))])]


@pytest.fixture(scope="module")
def tiny():
    cache: dict = {}

    def get(family):
        if family not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[family] = make_tiny_pipeline(family)
            cache[family].set_progress_bar_config(disable=True)
        return cache[family]

    return get


def modular(pipe, blocks, scale=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp = blocks.init_pipeline()
        mp.update_components(**{k: v for k, v in pipe.components.items() if v is not None})
        if scale is not None:
            mp.update_components(guider=ClassifierFreeGuidance(guidance_scale=scale))
    mp.set_progress_bar_config(disable=True)
    return mp


def run_modular(mp, steps=3, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mp(
            prompt=PROMPT,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            height=64,
            width=64,
            output_type="pt",
            **kwargs,
        )


def run_generate(pipe, controls, steps=3, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ac.generate(
            pipe,
            PROMPT,
            controls,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            height=64,
            width=64,
            output_type="pt",
            **kwargs,
        )


def _losses(trace):
    return [(r.index, r.loss) for r in trace]


CASES = [
    ("sdxl", AE, 1.0),
    ("sdxl", AE, 5.0),
    ("sd3", AE, 1.0),
    ("sd3", AE, 5.0),
    ("flux", AE, None),
    ("flux2", AE, None),
    ("klein", AE, 4.0),
    ("qwenimage", AE, 4.0),
    ("zimage", AE, 1.0),
    ("zimage", AE, 5.0),
    ("sdxl", lambda: [ac.InitNO(subjects=["cat", "dog"])], 1.0),
    ("flux", lambda: [ac.InitNO(subjects=["cat", "dog"])], None),
    ("sdxl", lambda: [ac.Regulate(subjects=["cat", "dog"])], 5.0),
    ("flux", lambda: [ac.Regulate(subjects=["cat", "dog"])], None),
    ("zimage", lambda: [ac.Regulate(subjects=["cat", "dog"])], 5.0),
    ("flux", lambda: [*REGIONS(), ac.AttendExcite(subjects=["cat", "dog"])], None),
    ("qwenimage", REGIONS, 4.0),
    ("sdxl", REGIONS, 5.0),
]


@pytest.mark.parametrize("family,controls,scale", CASES, ids=[f"{f}-{c()[0].method}-{s}" for f, c, s in CASES])
def test_modular_equals_generate(tiny, family, controls, scale):
    pipe = tiny(family)
    stock_kwargs = STOCK_CFG[family](scale) if scale is not None else {}
    modular_kwargs = {"negative_prompt": "blurry"} if family == "qwenimage" and scale and scale > 1 else {}
    mp = modular(pipe, attach(BLOCKS[family](), controls()), scale)
    state = run_modular(mp, **modular_kwargs)
    ours = run_generate(pipe, controls(), **stock_kwargs)
    image, trace = state.get("images"), state.get("attncontrol_trace")
    assert len(trace) == 3
    edits = [sorted(r.edits) for r in trace]
    assert edits == [sorted(r.edits) for r in ours.trace]
    if any(c.method in ("attend-excite", "initno") for c in controls()):
        assert trace[0].loss is not None  # the guidance ran
    if scale is not None and scale > 1 and family in BATCHED_CFG:
        # one batched forward against two: float32 rounding only
        torch.testing.assert_close(image, ours.images, atol=1e-4, rtol=0)
        for a, b in zip(trace, ours.trace):
            assert a.index == b.index
            if a.loss is not None:
                assert a.loss == pytest.approx(b.loss, abs=1e-5)
    else:
        assert torch.equal(image, ours.images)
        assert _losses(trace) == _losses(ours.trace)
    # not the trivial equality: the stock modular pipeline makes another image
    plain = run_modular(modular(pipe, BLOCKS[family]().get_workflow("text2image"), scale), **modular_kwargs)
    assert not torch.equal(plain.get("images"), image)


@pytest.mark.parametrize("family,scale", [("sdxl", 5.0), ("flux", None), ("qwenimage", 4.0)])
def test_no_controls_is_the_stock_modular_pipeline(tiny, family, scale):
    pipe = tiny(family)
    kwargs = {"negative_prompt": "blurry"} if family == "qwenimage" else {}
    stock = run_modular(modular(pipe, BLOCKS[family]().get_workflow("text2image"), scale), **kwargs)
    ours = run_modular(modular(pipe, attach(BLOCKS[family](), []), scale), **kwargs)
    assert torch.equal(stock.get("images"), ours.get("images"))
    assert ours.get("attncontrol_trace") == [] and ours.get("attncontrol_run") is None


def test_attention_maps_without_controls_equal_generate(tiny):
    pipe = tiny("flux")
    state = run_modular(modular(pipe, attach(M.FluxAutoBlocks(), [], attention=["cat", "dog"])))
    ours = run_generate(pipe, [], attention=["cat", "dog"])
    maps = state.get("attncontrol_attention")
    assert maps is not None and maps.labels == ours.attention.labels == [["cat", "dog"]]
    assert maps.steps == [0, 1, 2] and maps.maps.shape[0] == 3
    assert torch.equal(maps.maps, ours.attention.maps) and torch.equal(maps.raw, ours.attention.raw)
    assert torch.equal(state.get("images"), ours.images)


def test_num_images_per_prompt_and_given_latents(tiny):
    pipe = tiny("flux")
    latents = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    state = run_modular(modular(pipe, attach(M.FluxAutoBlocks(), AE())), num_images_per_prompt=2, latents=latents)
    ours = run_generate(pipe, AE(), num_images_per_prompt=2, latents=latents)
    assert state.get("images").shape[0] == 2
    # two images per prompt: the stock modular FLUX and FluxPipeline themselves differ by float32 rounding here
    # (about 1e-6 with no controls), so this is as close as the baseline allows
    torch.testing.assert_close(state.get("images"), ours.images, atol=1e-5, rtol=0)
    for a, b in zip(state.get("attncontrol_trace"), ours.trace):
        assert a.loss == pytest.approx(b.loss, abs=1e-5)


def test_a_bad_subject_fails_before_any_model_work(tiny):
    pipe = tiny("sdxl")
    mp = modular(pipe, attach(M.StableDiffusionXLAutoBlocks(), [ac.AttendExcite(subjects=["cat", "zebra"])]))
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(SubjectError, match="zebra"):
        run_modular(mp)
    assert pipe.unet.attn_processors == before


def test_processors_and_grad_flags_restored_when_the_loop_fails(tiny):
    pipe = tiny("sdxl")
    blocks = attach(M.StableDiffusionXLAutoBlocks(), AE())
    loop = blocks.sub_blocks["attncontrol"].sub_blocks["denoise.denoise"]

    class Boom(M.ModularPipelineBlocks):
        def __call__(self, components, block_state, i, t):
            if i == 1:
                raise RuntimeError("boom at step 1")
            return components, block_state

    loop.sub_blocks.insert("boom", Boom(), 2)
    mp = modular(pipe, blocks, 1.0)
    before = dict(pipe.unet.attn_processors)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    with pytest.raises(RuntimeError, match="boom at step 1"):
        run_modular(mp)
    assert pipe.unet.attn_processors == before
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


def test_the_run_is_shared_not_copied_when_a_state_is_passed_back(tiny):
    pipe = tiny("flux")
    mp = modular(pipe, attach(M.FluxAutoBlocks(), AE()))
    state = run_modular(mp)
    handle = state.get("attncontrol_run")
    assert copy.deepcopy(state).get("attncontrol_run") is handle
    assert handle.run.adapter.denoiser is pipe.transformer  # the view shares the modules


def test_attach_leaves_the_given_blocks_alone_and_places_every_block():
    blocks = M.StableDiffusionXLAutoBlocks()
    loop_before = list(blocks.get_workflow("text2image").sub_blocks["denoise.denoise"].sub_blocks)
    block = AttnControl(AE())
    attached = attach(blocks, block)
    assert block.encoder is None  # the caller's block stays unattached
    assert list(blocks.get_workflow("text2image").sub_blocks["denoise.denoise"].sub_blocks) == loop_before
    top = list(attached.sub_blocks)
    assert top[0] == "text_encoder" and isinstance(attached.sub_blocks["text_encoder"], AttnControl)
    scope = attached.sub_blocks["attncontrol"]
    inner = list(scope.sub_blocks)
    assert inner[0] == "attncontrol_noise" and inner[1].endswith("prepare_latents")
    loop = list(scope.sub_blocks[inner[-1]].sub_blocks)
    assert loop[0] == "attncontrol_guide" and loop[-1] == "attncontrol_end"
    assert loop[1:-1] == loop_before
    # what a modular pipeline loads for it: the encoder's components and the loop's
    names = {c.name for c in attached.expected_components}
    assert {"text_encoder", "tokenizer", "unet", "guider", "scheduler"} <= names


def test_attach_refuses_what_it_cannot_serve():
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionXLModularPipeline"):
        attach(M.WanBlocks() if hasattr(M, "WanBlocks") else M.FluxKontextAutoBlocks(), AE())
    with pytest.raises(OptionError, match="attncontrol controls"):
        AttnControl(["attend-excite"])
    with pytest.raises(OptionError, match="AttnControl"):
        attach(M.FluxAutoBlocks(), AttnControl(AE()), attention=True)


def test_other_workflows_and_many_branch_guiders_are_refused(tiny):
    with pytest.raises(OptionError, match="text-to-image only"):
        attach(M.StableDiffusionXLAutoBlocks(), AE(), workflow="image2image")
    from diffusers.guiders import PerturbedAttentionGuidance

    pipe = tiny("sdxl")
    mp = modular(pipe, attach(M.StableDiffusionXLAutoBlocks(), [ac.Regulate(subjects=["cat", "dog"])]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.update_components(guider=PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_layers=[0]))
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(UnsupportedPipelineError, match="3 branches per step; regulate"):
        run_modular(mp)
    assert pipe.unet.attn_processors == before


def test_an_unattached_block_says_how_to_attach():
    block = AttnControl(AE())
    with pytest.raises(UnsupportedPipelineError, match="attach"):
        block(None, M.PipelineState())


# -- save and load ---------------------------------------------------------------------------------------------


def test_save_and_load_offline_round_trip(tmp_path, tiny):
    controls = [*REGIONS(), ac.AttendExcite(subjects=["cat", "dog"], scale_factor=10.0)]
    folder = save_block(AttnControl(controls, attention=["cat"], checkpointing=True), tmp_path / "block")
    assert sorted(p.name for p in folder.iterdir()) == ["attncontrol_block.py", "modular_config.json"]
    config = json.loads((folder / "modular_config.json").read_text())
    assert config["auto_map"] == {"ModularPipelineBlocks": "attncontrol_block.AttnControlBlock"}
    loaded = AttnControl.from_pretrained(folder)
    assert loaded.controls == controls
    assert loaded.attention == ["cat"] and loaded.checkpointing is True
    # and it runs as the original does
    pipe = tiny("flux")
    a = run_modular(modular(pipe, attach(M.FluxAutoBlocks(), AttnControl(controls))))
    b = run_modular(modular(pipe, attach(M.FluxAutoBlocks(), AttnControl(loaded.controls))))
    assert torch.equal(a.get("images"), b.get("images"))


def test_a_folder_with_other_code_is_refused_without_trust(tmp_path):
    folder = save_block(AttnControl(AE()), tmp_path / "block")
    shim = folder / "attncontrol_block.py"
    shim.write_text(shim.read_text() + "\nimport os  # an edit\n")
    with pytest.raises(UntrustedBlockError, match="trust_remote_code=True"):
        load_block(folder)
    folder = save_block(AttnControl(AE()), tmp_path / "block2")
    (folder / "helper.py").write_text("x = 1\n")
    with pytest.raises(UntrustedBlockError, match="helper.py"):
        load_block(folder)
    folder = save_block(AttnControl(AE()), tmp_path / "block3")
    config = json.loads((folder / "modular_config.json").read_text())
    config["controls"][0]["scale_factor"] = 99.0  # the config no longer matches the module written for it
    (folder / "modular_config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedBlockError, match="not the module"):
        load_block(folder)


def test_trusted_folders_go_to_diffusers_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = save_block(AttnControl(AE()), tmp_path / "block")
    via_diffusers = M.ModularPipelineBlocks.from_pretrained(str(folder), trust_remote_code=True)
    assert isinstance(via_diffusers, AttnControl) and via_diffusers.controls == AE()
    with pytest.raises(ValueError):
        M.ModularPipelineBlocks.from_pretrained(str(folder), trust_remote_code=False)
    (folder / "helper.py").write_text("x = 1\n")
    loaded = load_block(folder, trust_remote_code=True)  # other code: handed to diffusers, which runs it
    assert loaded.controls == AE()
    # DIFFUSERS_DISABLE_REMOTE_CODE=1, as diffusers reads it at import
    monkeypatch.setattr("diffusers.utils.dynamic_modules_utils.DIFFUSERS_DISABLE_REMOTE_CODE", True)
    with pytest.raises(ValueError, match="DIFFUSERS_DISABLE_REMOTE_CODE"):
        load_block(folder, trust_remote_code=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_control_round_trips_as_json_data(method):
    cls = METHODS[method]
    kwargs = {"subjects": ["cat", "dog"]}
    if method == "boxdiff":
        kwargs = {"boxes": {"cat": (0.1, 0.1, 0.5, 0.9)}}
    elif method == "refocus":
        kwargs = {"boxes": {"cat": (0.1, 0.1, 0.5, 0.9), "dog": (0.5, 0.1, 0.9, 0.9)}}
    elif method == "regions":
        kwargs = {"regions": [("a cat", (0, 0, 0.5, 1))], "background": "grass"}
    control = cls(**kwargs)
    data = json.loads(json.dumps(control_data(control)))
    assert data["method"] == method
    assert control_from_data(data) == control


def test_control_data_names_what_is_wrong():
    with pytest.raises(OptionError, match="unknown method 'attend-and-excite'"):
        control_from_data({"method": "attend-and-excite"})
    with pytest.raises(OptionError, match="no field colour"):
        control_from_data({"method": "attend-excite", "subjects": ["cat"], "colour": 1})
    with pytest.raises(OptionError, match="scale_factor"):
        control_from_data({"method": "attend-excite", "subjects": ["cat"], "scale_factor": "big"})


def _example():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "modular.py"
    spec = importlib.util.spec_from_file_location("modular_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


EXAMPLE_FAMILIES = ["sdxl", "sd3", "flux", "flux2", "klein", "klein-base", "qwenimage", "zimage"]


@pytest.mark.parametrize("family", EXAMPLE_FAMILIES)
def test_the_example_runs_every_family(family, tmp_path, capsys):
    """examples/modular.py, one complete example per family: with --tiny it runs offline and guides."""
    example = _example()
    assert sorted(example.FAMILIES) == sorted(EXAMPLE_FAMILIES)
    out = tmp_path / f"{family}.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example.main(["--family", family, "--tiny", "--out", str(out), "--prompt", PROMPT, "--subjects", "cat", "dog"])
    assert out.is_file()
    assert "loss per guided step [0." in capsys.readouterr().out
