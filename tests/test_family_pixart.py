"""PixArt-Sigma: stock equality without controls (CFG on and off, resolution binning, prompts of different lengths),
captured maps equal to explicit float64 softmaxes under the caption mask, subjects at their T5 positions, every
control on the family, processors restored after errors, and the command line on a saved tiny folder."""

import math
import warnings

import pytest
import torch

import attncontrol
from attncontrol import (
    AStar,
    AttendExcite,
    BoxDiff,
    Conform,
    DivideBind,
    InitNO,
    OptionError,
    Refocus,
    Regulate,
    ResolutionError,
    SynGen,
)
from attncontrol.cli import main
from attncontrol.models import PixArtAdapter, get_adapter
from attncontrol.processors import CLASSIC
from attncontrol.testing import make_tiny_pixart_pipeline

from .conftest import fresh_copy, processor_snapshot, seeded

PROMPT = "a cat and a dog"
BOXES = {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}
SHORT = dict(max_sequence_length=24)  # T5's 300 positions shortened where a test does not need them


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-pixart") / "pixart"
    make_tiny_pixart_pipeline(seed=6).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def _loaded(pixart_dir):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the pipeline warns at every prompt that bs4/ftfy are missing for clean_caption
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(pixart_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def pixart(_loaded):
    return fresh_copy(_loaded)


def _run(pipe, controls, steps=3, **kw):
    return attncontrol.generate(
        pipe,
        kw.pop("prompt", PROMPT),
        controls,
        num_inference_steps=steps,
        generator=seeded(0),
        output_type="latent",
        **{**SHORT, **kw},
    )


# ---------------------------------------------------------------- the adapter


def test_the_pixart_pipeline_gets_its_adapter_with_classic_layers_at_the_patch_grid(pixart):
    adapter = get_adapter(pixart)
    assert isinstance(adapter, PixArtAdapter) and type(pixart).__name__ in adapter.pipeline_names
    assert adapter.default_size() == (256, 256) and adapter.size_multiple == 16
    layers = adapter.layers
    assert [(la.kind, la.block_index) for la in layers[:4]] == [("self", 0), ("cross", 0), ("self", 1), ("cross", 1)]
    assert len(layers) == 8 and all(la.ops is CLASSIC for la in layers)
    assert set(adapter.grids((32, 32)).values()) == {(16, 16)} and adapter.default_attn_res((32, 24)) == (16, 12)
    assert adapter.default_blocks() == {"cross": (1, 2), "self": (1, 2)}
    assert not adapter.flow_matching and adapter.exclude_eot_default


def test_the_latent_grid_is_the_binned_size_the_pipeline_samples(pixart):
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    adapter = get_adapter(pixart)
    h, w = pixart.image_processor.classify_height_width_bin(200, 320, ratios=ASPECT_RATIO_256_BIN)
    assert adapter.latent_hw(200, 320) == (int(h) // 8, int(w) // 8) != (25, 40)
    adapter.check_pipe_kwargs({"use_resolution_binning": False})
    assert adapter.latent_hw(192, 320) == (24, 40)
    with pytest.raises(ResolutionError, match="multiple of 16"):
        adapter.latent_hw(200, 320)


# ---------------------------------------------------------------- stock equality


@pytest.mark.parametrize(
    "prompt,kw",
    [
        (PROMPT, dict(guidance_scale=4.5)),
        (PROMPT, dict(guidance_scale=1.0)),
        (["a cat", "a cat and a small dog on the grass"], dict(height=200, width=320, negative_prompt="blurry")),
    ],
    ids=["cfg", "no-cfg", "two-prompts-binned"],
)
def test_without_controls_it_is_exactly_the_stock_pipeline(pixart, prompt, kw):
    kw = dict(num_inference_steps=3, output_type="latent", **kw)
    stock = pixart(prompt, generator=seeded(0), **kw).images
    ours = attncontrol.generate(pixart, prompt, [], generator=seeded(0), **kw).images
    assert torch.equal(ours, stock)


# ---------------------------------------------------------------- the captured maps, exactly


def _explicit_cross_maps(pipe, names, latents, t, cond):
    """Head- and layer-averaged cross-attention probabilities, from explicit float64 softmaxes computed by hooks
    on the attention modules (independent of the capture path) over each prompt's own (unmasked) T5 keys only:
    the masked keys get no probability at all."""
    found = []
    lengths = cond["encoder_attention_mask"].sum(-1).tolist()

    def hook(module, args, kwargs):
        q = module.to_q(args[0])
        k = module.to_k(kwargs["encoder_hidden_states"])
        b, n, _ = q.shape
        q = q.view(b, n, module.heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], module.heads, -1).transpose(1, 2)
        probs = torch.zeros(b, module.heads, n, k.shape[2], dtype=torch.float64)
        for i, length in enumerate(lengths):
            scores = q[i] @ k[i, :, :length].transpose(-1, -2) / math.sqrt(q.shape[-1])
            probs[i, :, :, :length] = torch.softmax(scores, dim=-1)
        found.append(probs.mean(1))

    modules = dict(pipe.transformer.named_modules())
    handles = [modules[n.removesuffix(".processor")].register_forward_pre_hook(hook, with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            get_adapter(pipe).guidance_forward(latents, t, cond)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(found).mean(0)


def test_captured_maps_equal_explicit_softmaxes_under_the_caption_mask(pixart):
    """Two prompts of different lengths in one batch: each image's maps are the softmax over its own T5 tokens;
    the padding keys (masked by the pipeline's -10000 bias) have probability exactly 0."""
    pixart.to(torch.float64)
    prompts = ["a cat", "a cat and a small dog on the grass"]
    control = AttendExcite(subjects=["cat"], exclude_eot=False)  # every T5 column kept
    run = attncontrol.prepare_run(pixart, prompts, [control], num_inference_steps=3, guidance_scale=1.0, **SHORT)
    latents = run.draw_latents().to(torch.float64)
    key = run.controls[0].maps.key
    names = run.engine.layer_names[key]
    with run.installed():
        run.engine.evaluate(latents, 0)
        captured = run.store.maps_of(names, key.grid)
    assert names == ["transformer_blocks.1.attn2.processor", "transformer_blocks.2.attn2.processor"]
    explicit = _explicit_cross_maps(pixart, names, latents, run.timesteps[0], run.cond)
    rows, cols = key.grid
    assert captured.dtype == torch.float64 and (rows, cols) == (16, 16)
    torch.testing.assert_close(captured.reshape(2, rows * cols, -1), explicit, rtol=0, atol=1e-12)
    lengths = run.cond["encoder_attention_mask"].sum(-1).tolist()
    assert lengths[0] < lengths[1] < 24
    assert captured[0, ..., lengths[0] :].abs().max() == 0 and captured[1, ..., lengths[1] :].abs().max() == 0
    assert captured[0, ..., : lengths[0]].sum(-1).sub(1).abs().max() < 1e-12


# ---------------------------------------------------------------- subjects


def test_subjects_resolve_to_their_t5_positions(pixart):
    run = attncontrol.prepare_run(pixart, "A Cat resting and a dog", [AttendExcite(subjects=["resting", "dog"])])
    table = attncontrol.tokenize(pixart.tokenizer, "a cat resting and a dog", 300)  # the encoder's lower-cased text
    rows = table.rows()
    resting = tuple(r.index for r in rows if r.word == "resting")
    dog = tuple(r.index for r in rows if r.word == "dog")
    assert run.controls[0].maps.subjects[0] == [resting, dog] and run.ctx.seq_len == 300
    assert table.prefix == 0 and rows[0].token.startswith("\u2581")  # no start token; the word-start marker
    keep = run.ctx.keep_mask(True)[0]
    assert keep.nonzero().flatten().tolist() == list(range(table.first_index, table.last_index + 1))


def test_a_subject_is_matched_as_the_encoder_sees_it_lower_cased(pixart, pixart_dir):
    """The pipeline lower-cases the prompt: "Cat" names the word "cat" of "A Cat ...", in the run and in the CLI's
    check before torch (the stream's template lower-cases the subject too)."""
    from attncontrol.cli.preflight import check_subjects

    run = attncontrol.prepare_run(pixart, "A Cat resting and a dog", [AttendExcite(subjects=["Cat", "dog"])])
    table = attncontrol.tokenize(pixart.tokenizer, "a cat resting and a dog", 300)
    cat = tuple(r.index for r in table.rows() if r.word == "cat")
    assert run.controls[0].maps.subjects[0][0] == cat
    check_subjects(str(pixart_dir), ["A Cat resting and a dog"], ["Cat", "dog"])


def test_velocity_rule_is_refused_on_this_epsilon_model(pixart):
    with pytest.raises(OptionError, match="flow-matching"):
        _run(pixart, [AttendExcite(subjects=["cat"], update="velocity")])


def test_refusals_are_typed(pixart):
    from diffusers import HeunDiscreteScheduler

    pixart.transformer.register_to_config(sample_size=24)  # a sample size the pipeline has no bins for
    with pytest.raises(ResolutionError, match="use_resolution_binning=False"):
        _run(pixart, [])
    assert _run(pixart, [], steps=1, use_resolution_binning=False).images.shape == (1, 4, 24, 24)
    pixart.scheduler = HeunDiscreteScheduler.from_config(pixart.scheduler.config)
    with pytest.raises(OptionError, match="first-order scheduler"):
        _run(pixart, [], use_resolution_binning=False)


# ---------------------------------------------------------------- every control


def _lowers(pipe, control, prompt, step=1):
    run = attncontrol.prepare_run(
        pipe, prompt, [control], num_inference_steps=10, guidance_scale=1.0, generator=seeded(0), **SHORT
    )
    z = run.draw_latents()
    with run.installed():
        before = run.engine.evaluate(z, step).objective.item()
        z2, record = run.guide(z, step)
        after = run.engine.evaluate(z2, step).objective.item()
    assert not torch.equal(z, z2), control.method
    assert record.updated == [True] and after < before, (control.method, before, after)


CONTROLS = {
    "attend-excite": lambda: AttendExcite(subjects=["cat", "dog"], thresholds={}, scale_factor=200),
    "astar": lambda: AStar(subjects=["cat", "dog"], scale_factor=200),
    "refocus": lambda: Refocus(boxes=BOXES, schedule=((10, 100.0, 1),)),
    "divide-bind": lambda: DivideBind(subjects=["red cat", "blue dog"], scale_factor=2000, thresholds={}),
    "conform": lambda: Conform(subjects=["red cat", "blue dog"], scale_factor=4000, refinement_steps=()),
    "syngen": lambda: SynGen(subjects=["red cat", "blue dog"], step_size=2000),
    "boxdiff": lambda: BoxDiff(boxes=BOXES, scale_factor=400, thresholds={}),
    "initno": lambda: InitNO(subjects=["cat", "dog"], optimise=False, scale_factor=400),
}


def test_attend_and_excite_lowers_its_loss(pixart):
    _lowers(pixart, CONTROLS["attend-excite"](), "a red cat and a blue dog")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CONTROLS if n != "attend-excite"])
def test_each_control_lowers_its_loss(pixart, name):
    _lowers(pixart, CONTROLS[name](), "a red cat and a blue dog")


def test_regulate_raises_the_targets_attention_with_cfg(pixart):
    out = _run(pixart, [Regulate(subjects=["cat", "dog"], iterations=5)], steps=3)
    stats = out.trace[0].edits["regulate"]
    assert stats["quantile_after"] > stats["quantile_before"]
    assert (out.images - _run(pixart, [], steps=3).images).abs().max() > 1e-4


def test_all_controls_compose_and_the_observer_records(pixart):
    before = processor_snapshot(pixart.transformer)
    controls = [
        AttendExcite(subjects=["cat", "dog"]),
        AStar(subjects=["cat", "dog"]),
        Refocus(boxes=BOXES),
        Regulate(subjects=["cat", "dog"], iterations=3),
    ]
    out = _run(pixart, controls, steps=3, attention=True)
    assert [r.index for r in out.guided_steps] == [0, 1, 2]
    assert set(out.trace[0].losses) == {"attend-excite", "astar", "refocus"} and out.trace[0].edits["regulate"]
    assert out.attention.maps.shape == (3, 1, 2, 16, 16) and torch.isfinite(out.attention.maps).all()
    assert (out.images - _run(pixart, [], steps=3).images).abs().max() > 1e-4
    assert processor_snapshot(pixart.transformer) == before


@pytest.mark.slow
def test_each_method_runs_end_to_end(pixart):
    controls = [
        DivideBind(subjects=["red cat", "dog"], first_refinement_steps=1, max_refinement_steps=1),
        Conform(subjects=["red cat", "blue dog"], refinement_iterations=1),
        SynGen(subjects=["red cat", "blue dog"]),
        BoxDiff(boxes=BOXES, max_refinement_steps=1),
        InitNO(subjects=["cat", "dog"], rounds=1, round_steps=2, final_steps=0, max_refinement_steps=1),
    ]
    for control in controls:
        out = _run(pixart, [control], prompt="a red cat and a blue dog")
        assert [r.index for r in out.guided_steps] == [0, 1, 2], control.method
        assert all(math.isfinite(r.loss[0]) for r in out.guided_steps)
    assert out.noise_search["initno"][0]["rounds"] == 1


@pytest.mark.slow
def test_checkpointing_gives_the_same_images(pixart):
    controls = [
        AttendExcite(subjects=["cat", "dog"], thresholds={0: 0.9}, max_refinement_steps=2),
        Refocus(boxes=BOXES),
    ]
    plain = _run(pixart, controls, steps=2).images
    torch.testing.assert_close(_run(pixart, controls, steps=2, checkpointing=True).images, plain, rtol=0, atol=1e-6)


def test_processors_restored_after_an_error(pixart):
    before = processor_snapshot(pixart.transformer)
    grads = [p.requires_grad for p in pixart.transformer.parameters()]

    def boom(p, i, t, kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(pixart, [AttendExcite(subjects=["cat", "dog"]), Regulate(subjects=["cat"])], callback_on_step_end=boom)
    assert processor_snapshot(pixart.transformer) == before
    assert [p.requires_grad for p in pixart.transformer.parameters()] == grads


# ---------------------------------------------------------------- the command line


def test_tokens_command_shows_the_t5_table(pixart_dir, capsys):
    assert main(["tokens", PROMPT, "--model", str(pixart_dir)]) == 0
    out = capsys.readouterr().out
    assert "\u2581cat" in out and "\u2581dog" in out and "<|startoftext|>" not in out


@pytest.mark.slow
def test_generate_command_runs_a_method_on_the_saved_folder(pixart_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "cat_dog.png"
    argv = ["generate", PROMPT, "--subjects", "cat", "dog", "--model", str(pixart_dir), "--out", str(out)]
    assert main([*argv, "--steps", "2", "--seed", "1", "--methods", "astar"]) == 0
    with Image.open(out) as img:
        assert img.size == (256, 256)
