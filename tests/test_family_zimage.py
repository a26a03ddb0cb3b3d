"""Z-Image (``ZImagePipeline``): stock equality without controls (CFG on and off), exact maps of the single-stream
layers (padded image and caption segments, complex RoPE, a key mask for prompts of different lengths) against an
explicit softmax, subjects at the positions the transformer attends to, every control on this family, the
[positive; negative] CFG batch, processors restored after errors, the command line on a saved tiny folder."""

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
    Refocus,
    Regulate,
    SubjectError,
    SynGen,
)
from attncontrol.testing import make_tiny_pipeline

from .conftest import seeded

PROMPT = "a red cat and a blue dog"
TWO = (
    "a cat and a dog",
    "a small red cat sitting next to a large blue dog on the green grass of a sunny garden, with tall trees and "
    "yellow flowers behind them",
)
KW = dict(height=96, width=96)  # a 6x6 token grid: 36 image tokens, padded by the transformer to 64
BOXES = {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}


def _processors(pipe) -> dict[str, int]:
    return {n: id(m.processor) for n, m in pipe.transformer.named_modules() if hasattr(m, "set_processor")}


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-zimage") / "zimage"
    make_tiny_pipeline("zimage", seed=7).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def zimage(zimage_dir):
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(zimage_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, controls, prompt=PROMPT, steps=3, **kw):
    return attncontrol.generate(
        pipe, prompt, controls, num_inference_steps=steps, generator=seeded(0), output_type="latent", **{**KW, **kw}
    )


# ---------------------------------------------------------------- the stock pipeline, bit for bit


@pytest.mark.parametrize("guidance_scale", [0.0, 5.0], ids=["turbo-no-cfg", "cfg"])
def test_without_controls_it_is_exactly_the_stock_pipeline(zimage, guidance_scale):
    for prompt in (PROMPT, list(TWO)):  # two prompts of different lengths: a key mask in every layer
        kw = dict(num_inference_steps=3, guidance_scale=guidance_scale, output_type="latent", **KW)
        # a copy: ZImagePipeline._encode_prompt writes the templated text into the list it is given
        stock = zimage(list(prompt) if isinstance(prompt, list) else prompt, generator=seeded(0), **kw).images
        ours = attncontrol.generate(zimage, prompt, [], generator=seeded(0), **kw).images
        assert torch.equal(stock, ours)


def test_the_adapter_reads_the_pipelines_facts(zimage):
    from attncontrol.models import ZImageAdapter, get_adapter

    adapter = get_adapter(zimage)
    assert isinstance(adapter, ZImageAdapter)
    assert [la.name for la in adapter.layers if la.kind == "cross"] == [
        f"layers.{i}.attention.processor" for i in range(3)
    ]
    assert adapter.default_blocks() == {"cross": (0, 1), "self": (0, 1)}
    assert not adapter.uses_cfg(0.0) and adapter.uses_cfg(1.0)  # ZImagePipeline: CFG whenever the scale is > 0
    assert adapter.latent_shape(1, adapter.latent_hw(96, 96)) == (1, 16, 12, 12)
    with pytest.raises(attncontrol.ResolutionError):
        adapter.latent_hw(88, 96)  # the pipeline wants multiples of 16


# ---------------------------------------------------------------- exact maps


def _rope(x, freqs):
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


def _explicit_maps(pipe, run, names, latents, n_img):
    """Head- and layer-averaged image -> caption-part probabilities from the full (L x L) masked softmax, by
    forward pre-hooks on the attention modules (independent of the capture path), float64."""
    found = []

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        mask, freqs = kwargs["attention_mask"], kwargs["freqs_cis"]
        q = module.norm_q(module.to_q(x).unflatten(-1, (module.heads, -1)))
        k = module.norm_k(module.to_k(x).unflatten(-1, (module.heads, -1)))
        q, k = _rope(q, freqs).transpose(1, 2), _rope(k, freqs).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
        p = torch.softmax(scores, dim=-1)
        start = -(-n_img // 32) * 32
        found.append(p[:, :, :n_img, start:].mean(1))

    modules = dict(pipe.transformer.named_modules())
    handles = [modules[n.removesuffix(".processor")].register_forward_pre_hook(hook, with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            run.adapter.guidance_forward(latents, run.timesteps[0], run.cond)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(found).mean(0)


def test_captured_maps_equal_the_explicit_masked_softmax(zimage):
    from tests.conftest import fresh_copy

    pipe = fresh_copy(zimage).to(torch.float64)
    control = AttendExcite(subjects=["cat", "dog"], exclude_eot=False)  # every caption-part column kept
    run = attncontrol.prepare_run(pipe, list(TWO), [control], num_inference_steps=3, guidance_scale=0.0, **KW)
    latents = run.draw_latents().to(torch.float64)
    key = run.controls[0].maps.key
    names = run.engine.layer_names[key]
    with run.installed():
        run.engine.evaluate(latents, 0)
        captured = run.store.maps_of(names, key.grid)
    rows, cols = key.grid
    explicit = _explicit_maps(pipe, run, names, latents, rows * cols)
    lengths = run.cond["text_lengths"].tolist()
    assert lengths[0] < lengths[1] and explicit.shape[-1] == run.ctx.seq_len == -(-lengths[1] // 32) * 32
    kept = run.store.columns  # the [1:-1] rule over the templated stream: all but the template's 3-token prefix
    dropped = sorted(set(range(explicit.shape[-1])) - set(kept.tolist()))  # and the last slot
    assert dropped == [0, 1, 2, explicit.shape[-1] - 1]
    captured = captured.reshape(2, rows * cols, -1)
    torch.testing.assert_close(captured[..., kept], explicit[..., kept], rtol=0, atol=1e-12)
    short = -(-lengths[0] // 32) * 32  # the short prompt's caption part; beyond it the mask: probability 0
    assert explicit[0, :, short:].abs().max() == 0 and captured[0, :, short:-1].abs().max() == 0
    assert captured[0, :, lengths[0] : short].min() > 0  # the caption pad tokens are attended
    assert len(names) == 2  # the default blocks: the first half of the 3 main layers


def test_the_form_reads_q_k_v_as_the_layers_own_processor(zimage):
    """Attention formed from the form's q, k and v (masked, through the output projection) is the layer's output."""
    from tests.conftest import fresh_copy

    pipe = fresh_copy(zimage).to(torch.float64)
    form = attncontrol.models.get_adapter(pipe).form
    attn = pipe.transformer.layers[1].attention
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 96, 32, generator=g, dtype=torch.float64)
    freqs = torch.polar(
        torch.ones(2, 96, 8, dtype=torch.float64), torch.randn(2, 96, 8, generator=g, dtype=torch.float64)
    )
    mask = torch.arange(96)[None] < torch.tensor([[64 + 32], [64 + 20]])
    args = {"hidden_states": x, "attention_mask": mask, "freqs_cis": freqs}
    with torch.no_grad():
        theirs = attn.processor(attn, **args)
        q, k, _ = form.query_key(attn, args)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask[:, None, None], -math.inf)
        out = (torch.softmax(scores, -1) @ form.values(attn, args)).transpose(1, 2).flatten(2)
        ours = attn.to_out[0](out)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- subjects at the attended positions


def test_subjects_are_the_positions_of_the_pipelines_own_tokens(zimage):
    run = attncontrol.prepare_run(zimage, list(TWO), [], num_inference_steps=2, guidance_scale=0.0, **KW)
    tok = zimage.tokenizer
    for k, prompt in enumerate(TWO):
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        ids = tok([rendered], padding="max_length", max_length=512, return_tensors="pt")
        kept = ids.input_ids[0][ids.attention_mask[0].bool()]  # what _encode_prompt hands on
        assert run.cond["text_lengths"][k] == len(kept)
        (cat, dog) = run.ctx.text.resolve(k, ["cat", "dog"])
        assert tok.decode(kept[list(cat)]) == " cat" and tok.decode(kept[list(dog)]) == " dog"
        assert cat[0] > 3  # after the template's "<|im_start|>user\n"
    with pytest.raises(SubjectError, match="horse"):
        _run(zimage, [AttendExcite(subjects=["cat", "horse"])])


# ---------------------------------------------------------------- every control on this family

CONTROLS = {
    "attend-excite": lambda: AttendExcite(subjects=["cat", "dog"], thresholds={}, scale_factor=200),
    "astar": lambda: AStar(subjects=["cat", "dog"], scale_factor=200),
    "refocus": lambda: Refocus(boxes=BOXES, schedule=((10, 100.0, 1),)),
    "attend-excite-velocity": lambda: AttendExcite(subjects=["cat", "dog"], update="velocity", velocity_scale=20),
    "divide-bind": lambda: DivideBind(subjects=["red cat", "blue dog"], scale_factor=2000, thresholds={}),
    "conform": lambda: Conform(subjects=["red cat", "blue dog"], scale_factor=400, refinement_steps=()),
    "syngen": lambda: SynGen(subjects=["red cat", "blue dog"], step_size=2000),
    "boxdiff": lambda: BoxDiff(boxes=BOXES, scale_factor=400, thresholds={}),
    "initno": lambda: InitNO(subjects=["cat", "dog"], optimise=False, scale_factor=400),
}
FAST = ("attend-excite", "attend-excite-velocity")


def _lowers(pipe, name):
    control = CONTROLS[name]()
    run = attncontrol.prepare_run(
        pipe, PROMPT, [control], num_inference_steps=8, guidance_scale=0.0, generator=seeded(0), **KW
    )
    z = run.draw_latents()
    with run.installed():
        before = run.engine.evaluate(z, 1).objective
        z2, record = run.guide(z, 1)
        if name.endswith("velocity"):  # the shift goes to the next latents: apply it here to measure it
            z2 = z2 - run.engine.take_deferred(1)
        after = run.engine.evaluate(z2, 1).objective
    assert not torch.equal(z, z2), name
    assert after.item() < before.item(), name


@pytest.mark.parametrize("name", FAST)
def test_a_guidance_step_lowers_the_loss(zimage, name):
    _lowers(zimage, name)


@pytest.mark.parametrize("name", [n for n in CONTROLS if n not in FAST])
def test_each_control_lowers_its_loss(zimage, name):
    _lowers(zimage, name)


@pytest.mark.slow
def test_each_method_runs_end_to_end(zimage):
    for make in CONTROLS.values():
        control = make()
        out = _run(zimage, [control], steps=3, guidance_scale=0.0)
        assert out.guided_steps, control.method


# ---------------------------------------------------------------- the [positive; negative] batch


def test_observer_records_the_positive_branch_of_the_cfg_batch(zimage):
    """ZImagePipeline forwards [positive; negative] in one batch: the observer keeps the positive rows, so its
    first-step maps equal those of a run without CFG (same noise, same positive forward)."""
    kw = dict(attention=["cat", "dog"], steps=1)
    plain = _run(zimage, [], guidance_scale=0.0, **kw).attention.maps
    cfg = _run(zimage, [], guidance_scale=4.0, negative_prompt="a blurry photo of a bird in the sky", **kw)
    torch.testing.assert_close(cfg.attention.maps, plain, rtol=1e-5, atol=1e-6)


def test_regulate_raises_the_targets_attention_under_cfg(zimage):
    regulate = Regulate(subjects=["cat", "dog"], iterations=5)
    out = _run(zimage, [regulate], steps=3, guidance_scale=4.0, cfg_truncation=0.5)  # late steps: positive only
    stats = [r.edits["regulate"] for r in out.trace if r.edits.get("regulate")]
    assert stats and all(s["quantile_after"] > s["quantile_before"] for s in stats)
    plain = _run(zimage, [], steps=3, guidance_scale=4.0, cfg_truncation=0.5)
    assert (out.images - plain.images).abs().max() > 1e-4


def test_all_controls_compose_and_the_observer_records(zimage):
    controls = [
        AttendExcite(subjects=["cat", "dog"]),
        AStar(subjects=["cat", "dog"]),
        Refocus(boxes=BOXES),
        Regulate(subjects=["cat", "dog"], iterations=2),
    ]
    out = _run(zimage, controls, steps=2, guidance_scale=3.0, attention=True)
    assert set(out.trace[0].losses) == {"attend-excite", "astar", "refocus"} and out.trace[0].edits["regulate"]
    assert out.attention.maps.shape == (2, 1, 2, 6, 6) and torch.isfinite(out.attention.maps).all()


def test_processors_restored_after_an_error(zimage):
    before = _processors(zimage)
    grads = [p.requires_grad for p in zimage.transformer.parameters()]

    def boom(p, i, t, kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(zimage, [AttendExcite(subjects=["cat", "dog"]), Regulate(subjects=["cat"])], callback_on_step_end=boom)
    assert _processors(zimage) == before
    assert [p.requires_grad for p in zimage.transformer.parameters()] == grads


# ---------------------------------------------------------------- the command line on the saved folder


def test_cli_tokens_prints_the_templated_stream(zimage_dir, capsys):
    from attncontrol.cli import main

    assert main(["tokens", "a cat and a dog", "--model", str(zimage_dir)]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>" in out and "<|im_end|>" in out and "Ġcat" in out  # the template's tokens too
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows if r[1] in ("Ġcat", "Ġdog")] == ["4", "7"]


@pytest.mark.slow
def test_cli_generate_runs_a_method(zimage_dir, tmp_path):
    from attncontrol.cli import main

    out = tmp_path / "z.png"
    argv = ["generate", "a cat and a dog", "--subjects", "cat", "dog", "--model", str(zimage_dir), "--out", str(out)]
    assert main([*argv, "--steps", "2", "--height", "64", "--width", "64", "--guidance-scale", "0"]) == 0
    assert out.exists()
