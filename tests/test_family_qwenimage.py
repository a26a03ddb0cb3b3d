"""Qwen-Image (QwenImagePipeline): stock equality without controls (with and without true CFG, one prompt and a
padded batch), exact joint-attention maps against explicit float64 softmaxes (also with the text key mask),
subjects at the positions the transformer attends to (the template with its 34-token drop), every control on the
family, processors restored after errors, and the command line on a saved tiny folder."""

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
    SynGen,
)
from attncontrol.cli import main

from .conftest import fresh_copy, processor_snapshot, seeded

PROMPT = "a cat and a dog"
TWO = ["a cat", "a cat and a dog"]  # different lengths: the encoder pads the first, the transformer masks it
BOXES = {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}
KW = dict(height=128, width=128)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from attncontrol.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-qwenimage") / "qwenimage", family="qwenimage", seed=6)


@pytest.fixture(scope="module")
def _qwen_loaded(qwen_dir):
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(qwen_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def qwen(_qwen_loaded):
    return fresh_copy(_qwen_loaded)


def _run(pipe, controls, steps=3, prompt=PROMPT, **kw):
    return attncontrol.generate(
        pipe, prompt, controls, num_inference_steps=steps, generator=seeded(0), output_type="latent", **KW, **kw
    )


# ---------------------------------------------------------------- the family's facts


def test_the_saved_folder_is_a_qwenimage_pipeline_with_its_own_template(_qwen_loaded):
    """Reloaded from safetensors; the torch-free copy of the template in loading.py is the pipeline's own."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    from attncontrol.loading import STREAM_TEMPLATES, TOKEN_STREAMS
    from attncontrol.models import QwenImageAdapter, get_adapter
    from attncontrol.processors.complex_rotary import COMPLEX_ROTARY_JOINT

    assert isinstance(_qwen_loaded, QwenImagePipeline)
    template = STREAM_TEMPLATES["QwenImagePipeline"]["tokenizer"]
    assert template.pattern == _qwen_loaded.prompt_template_encode
    assert template.drop == _qwen_loaded.prompt_template_encode_start_idx == 34
    adapter = get_adapter(_qwen_loaded)
    assert isinstance(adapter, QwenImageAdapter) and adapter.token_streams == TOKEN_STREAMS["QwenImagePipeline"]
    assert adapter.template == template
    layers = adapter.layers
    assert len(layers) == 4 and all(la.ops is COMPLEX_ROTARY_JOINT for la in layers)
    assert adapter.default_blocks() == {"cross": (0, 1), "self": (0, 1)}


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "true-cfg"])
def test_without_controls_it_is_exactly_the_stock_pipeline(_qwen_loaded, cfg):
    pipe = _qwen_loaded
    extra = dict(true_cfg_scale=2.5, negative_prompt="a bird") if cfg else {}
    kw = dict(num_inference_steps=3, output_type="latent", **KW, **extra)
    stock = pipe(PROMPT, generator=seeded(0), **kw).images
    ours = attncontrol.generate(pipe, PROMPT, [], generator=seeded(0), **kw).images
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("per_prompt", [1, 2])
def test_a_padded_batch_without_controls_is_the_stock_pipeline(_qwen_loaded, per_prompt):
    """Two prompts of different lengths (and two images each): the encoder's mask reaches the transformer, each
    image's rows with its own prompt's mask. The stock pipeline is given the embeddings and masks repeated prompt
    by prompt: its own ``num_images_per_prompt`` repeats the mask in another order than the embeddings (a
    diffusers 0.42.1 bug, ``encode_prompt``), which with one image per prompt changes nothing."""
    kw = dict(num_inference_steps=2, output_type="latent", **KW)
    embeds, mask = _qwen_loaded.encode_prompt(TWO, device="cpu")
    assert mask is not None and not bool(mask.all())  # the shorter prompt is padded
    repeated = dict(
        prompt_embeds=embeds.repeat_interleave(per_prompt, 0), prompt_embeds_mask=mask.repeat_interleave(per_prompt, 0)
    )
    stock = _qwen_loaded(generator=seeded(0), **repeated, **kw).images
    if per_prompt == 1:
        assert torch.equal(stock, _qwen_loaded(TWO, generator=seeded(0), **kw).images)
    ours = attncontrol.generate(_qwen_loaded, TWO, [], generator=seeded(0), num_images_per_prompt=per_prompt, **kw)
    assert torch.equal(ours.images, stock)


# ---------------------------------------------------------------- the captured maps, exactly


def _explicit_cross_maps(pipe, prompts, layer_names, latents, run):
    """Head- and layer-averaged image->text probabilities from explicit (M+N)^2 float64 softmaxes, computed by
    forward-pre-hooks on the attention modules with diffusers' own rotary function (independent of the form)."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    found = []

    def hook(module, args, kwargs):
        h, c = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        d = module.inner_dim // module.heads
        img_f, txt_f = kwargs["image_rotary_emb"]

        def proj(x, lin, norm, freqs):
            return apply_rotary_emb_qwen(norm(lin(x).unflatten(-1, (-1, d))), freqs, use_real=False)

        q = torch.cat(
            [proj(c, module.add_q_proj, module.norm_added_q, txt_f), proj(h, module.to_q, module.norm_q, img_f)], 1
        )
        k = torch.cat(
            [proj(c, module.add_k_proj, module.norm_added_k, txt_f), proj(h, module.to_k, module.norm_k, img_f)], 1
        )
        q, k = q.transpose(1, 2).double(), k.transpose(1, 2).double()
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        m = c.shape[1]
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is not None:
            keys = torch.cat([mask.bool(), torch.ones(h.shape[:2], dtype=torch.bool)], 1)
            scores = scores.masked_fill(~keys[:, None, None, :], -math.inf)
        found.append(torch.softmax(scores, dim=-1)[:, :, m:, :m].mean(1))

    modules = dict(pipe.transformer.named_modules())
    handles = [
        modules[n.removesuffix(".processor")].register_forward_pre_hook(hook, with_kwargs=True) for n in layer_names
    ]
    try:
        with torch.no_grad():
            run.adapter.guidance_forward(latents, run.timesteps[0], run.cond)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(found).mean(0)


def test_masked_text_probabilities_equal_an_explicit_masked_softmax_values_and_gradients():
    """Per batch row, masked text keys out of the denominator and at probability 0, in float64, against the
    explicit softmax over all keys with the masked ones at -inf: values and gradients for q and every key."""
    from attncontrol.processors.complex_rotary import masked_text_probs

    g = seeded(0)
    b, h, n, m, d = 2, 3, 10, 6, 8
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, m + n, d, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, False, False], [True, False, True, True, True, True]])
    cols = torch.tensor([0, 2, 4])
    weights = torch.randn(b, h, n, len(cols), generator=g, dtype=torch.float64)
    scale = 1 / math.sqrt(d)

    probs, mass = masked_text_probs(q, k, 0, cols, scale, mask)
    keys = torch.cat([mask, torch.ones(b, n, dtype=torch.bool)], 1)[:, None, None, :]
    explicit = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~keys, -math.inf), dim=-1)
    torch.testing.assert_close(probs, explicit[..., cols], rtol=0, atol=1e-12)
    torch.testing.assert_close(mass, explicit[..., :m].sum(-1), rtol=0, atol=1e-12)
    assert probs[0, ..., 2].abs().max() == 0 and probs[1, ..., 0].min() > 0  # row 0 masks column 4 only
    assert probs[0, ..., 0].min() > 0 and explicit[0, ..., 4].abs().max() == 0

    gq, gk = torch.autograd.grad((probs * weights).sum() + mass.sum(), [q, k])
    eq, ek = torch.autograd.grad((explicit[..., cols] * weights).sum() + explicit[..., :m].sum(), [q, k])
    torch.testing.assert_close(gq, eq, rtol=0, atol=1e-10)
    torch.testing.assert_close(gk, ek, rtol=0, atol=1e-10)
    assert gq.abs().max() > 1e-3 and gk.abs().max() > 1e-3


def test_the_width_config_is_the_published_block_width():
    """QWENIMAGE_WIDTH_CONFIG builds (on the meta device: no memory) and has the published model's block width,
    which diffusers' constructor defaults are (24 heads x 128, text 3584 wide), with 2 of its 60 blocks."""
    import inspect

    from diffusers import QwenImageTransformer2DModel

    from attncontrol.testing import QWENIMAGE_WIDTH_CONFIG

    defaults = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    for key in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "in_channels", "patch_size"):
        assert QWENIMAGE_WIDTH_CONFIG[key] == defaults[key].default, key
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**QWENIMAGE_WIDTH_CONFIG)
    assert model.inner_dim == 3072 and len(model.transformer_blocks) == 2


@pytest.mark.parametrize("prompts", [PROMPT, TWO], ids=["one-prompt", "padded-batch"])
def test_captured_maps_equal_the_explicit_joint_softmax(qwen, prompts):
    pipe = qwen.to(torch.float64)
    control = AttendExcite(subjects=["cat"], exclude_eot=False)  # every text column but the first and last
    run = attncontrol.prepare_run(pipe, prompts, [control], num_inference_steps=3, **KW)
    latents = run.draw_latents().to(torch.float64)
    key = run.controls[0].maps.key
    names = run.engine.layer_names[key]
    with run.installed():
        run.engine.evaluate(latents, 0)
        captured = run.store.maps_of(names, key.grid)
    explicit = _explicit_cross_maps(pipe, prompts, names, latents, run)
    rows, cols = key.grid
    kept = run.store.columns
    n = latents.shape[0]
    assert len(names) == 2 and explicit.shape == (n, rows * cols, run.ctx.seq_len)
    torch.testing.assert_close(captured.reshape(n, rows * cols, -1)[..., kept], explicit[..., kept], rtol=0, atol=1e-12)
    if isinstance(prompts, list):  # the short prompt's padding columns: masked keys, probability exactly 0
        short = len(run.adapter.tokenizer(TWO[0]).input_ids)
        pad = [c for c in kept.tolist() if c >= short]
        assert pad and captured.reshape(n, rows * cols, -1)[0][:, pad].abs().max() == 0
        assert explicit[1][:, pad].min() > 0  # the longer prompt attends there


# ---------------------------------------------------------------- subjects where the transformer attends


def test_subjects_resolve_to_the_positions_the_transformer_attends_to(_qwen_loaded):
    """A subject's position is its token's place in the pipeline's own tokenisation of the template minus the 34
    dropped tokens, and the text embedding there is the encoder's hidden state of that token."""
    pipe = _qwen_loaded
    run = attncontrol.prepare_run(pipe, PROMPT, [AttendExcite(subjects=["cat", "dog"])], num_inference_steps=2, **KW)
    ((cat, dog),) = run.controls[0].maps.subjects
    full = pipe.tokenizer(pipe.prompt_template_encode.format(PROMPT)).input_ids
    kept = full[pipe.prompt_template_encode_start_idx :]
    (cat_id,) = pipe.tokenizer(" cat", add_special_tokens=False).input_ids
    (dog_id,) = pipe.tokenizer(" dog", add_special_tokens=False).input_ids
    assert cat == (kept.index(cat_id),) and dog == (kept.index(dog_id),)
    assert run.ctx.seq_len == len(kept) == run.cond["encoder_hidden_states"].shape[1]
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=torch.tensor([full]), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(run.cond["encoder_hidden_states"][0, cat[0]], hidden[0, 34 + cat[0]])
    # the template's suffix (<|im_end|>, <|im_start|>assistant) is special: never a subject, left out of softmaxes
    table = attncontrol.tokenize(run.adapter.tokenizer, PROMPT, run.ctx.seq_len)
    assert table.suffix >= 3 and table.tokens[table.last_index + 1] == "<|im_end|>"
    assert run.ctx.keep_mask(True)[0].nonzero().flatten().tolist() == list(
        range(table.first_index, table.last_index + 1)
    )


def test_a_batch_of_prompts_gets_one_stream_as_long_as_the_longest(_qwen_loaded):
    run = attncontrol.prepare_run(_qwen_loaded, TWO, [AttendExcite(subjects=["cat"])], num_inference_steps=2, **KW)
    lengths = [len(run.adapter.tokenizer(p).input_ids) for p in TWO]
    assert run.ctx.seq_len == max(lengths) == run.cond["encoder_hidden_states"].shape[1]
    assert run.cond["encoder_hidden_states_mask"].sum(1).tolist() == lengths


# ---------------------------------------------------------------- every control


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


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONTROLS))
def test_each_control_lowers_its_loss(_qwen_loaded, name):
    control = CONTROLS[name]()
    prompt = "a red cat and a blue dog"
    run = attncontrol.prepare_run(_qwen_loaded, prompt, [control], num_inference_steps=10, generator=seeded(0), **KW)
    z = run.draw_latents()
    with run.installed():
        before = run.engine.evaluate(z, 1).objective
        z2, record = run.guide(z, 1)
        if name.endswith("velocity"):  # the shift goes to the next latents: apply it here to measure it
            z2 = z2 - run.engine.take_deferred(1)
        after = run.engine.evaluate(z2, 1).objective
    assert not torch.equal(z, z2)
    assert after.item() < before.item()


@pytest.mark.slow
def test_each_method_runs_end_to_end_and_restores_the_processors(_qwen_loaded):
    before = processor_snapshot(_qwen_loaded.transformer)
    controls = [
        DivideBind(subjects=["red cat", "dog"], first_refinement_steps=2, max_refinement_steps=2),
        Conform(subjects=["red cat", "blue dog"], refinement_iterations=2, refinement_steps=(0, 2)),
        SynGen(subjects=["red cat", "blue dog"], stop=3),
        BoxDiff(boxes=BOXES, max_refinement_steps=2),
        InitNO(subjects=["cat", "dog"], rounds=1, round_steps=2, final_steps=1, refinement_steps=(1,)),
    ]
    for control in controls:
        out = _run(_qwen_loaded, [control], steps=4, prompt="a red cat and a blue dog")
        assert out.guided_steps and all(math.isfinite(r.loss[0]) for r in out.guided_steps), control.method
        assert processor_snapshot(_qwen_loaded.transformer) == before
    (report,) = out.noise_search["initno"]
    assert report["rounds"] == 1


def test_checkpointing_gives_the_same_images(_qwen_loaded):
    controls = [
        AttendExcite(subjects=["cat", "dog"], thresholds={0: 0.9}, max_refinement_steps=2),
        Refocus(boxes=BOXES),
    ]
    plain = _run(_qwen_loaded, controls, steps=2).images
    ckpt = _run(_qwen_loaded, controls, steps=2, checkpointing=True).images
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-6)
    assert (plain - _run(_qwen_loaded, [], steps=2).images).abs().max() > 1e-4


@pytest.mark.slow
def test_regulate_raises_the_targets_attention_with_and_without_true_cfg(_qwen_loaded):
    for extra in ({}, dict(true_cfg_scale=2.0, negative_prompt="a bird")):
        out = _run(_qwen_loaded, [Regulate(subjects=["cat", "dog"], iterations=5)], steps=3, **extra)
        stats = out.trace[0].edits["regulate"]
        assert stats["quantile_after"] > stats["quantile_before"]
        plain = _run(_qwen_loaded, [], steps=3, **extra)
        assert (out.images - plain.images).abs().max() > 1e-4


def test_controls_compose_and_the_observer_records(_qwen_loaded):
    controls = [
        AttendExcite(subjects=["cat", "dog"]),
        AStar(subjects=["cat", "dog"]),
        Refocus(boxes=BOXES),
        Regulate(subjects=["cat", "dog"], iterations=2),
    ]
    out = _run(_qwen_loaded, controls, steps=2, attention=True)
    assert set(out.trace[0].losses) == {"attend-excite", "astar", "refocus"} and out.trace[0].edits["regulate"]
    assert out.attention.maps.shape == (2, 1, 2, 8, 8) and torch.isfinite(out.attention.maps).all()


def test_a_padded_batch_runs_guided_and_edited(_qwen_loaded):
    """The text key mask through a guidance pass and an attention edit: finite, and guided."""
    out = _run(
        _qwen_loaded, [AttendExcite(subjects=["cat"]), Regulate(subjects=["cat"], iterations=2)], steps=2, prompt=TWO
    )
    assert out.images.shape == (2, 64, 16) and torch.isfinite(out.images).all()
    assert out.guided_steps and all(math.isfinite(v) for v in out.trace[0].losses["attend-excite"])


def test_processors_restored_after_an_error(qwen):
    before = processor_snapshot(qwen.transformer)
    grads = [p.requires_grad for p in qwen.transformer.parameters()]

    def boom(p, i, t, kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(qwen, [AttendExcite(subjects=["cat", "dog"]), Regulate(subjects=["cat"])], callback_on_step_end=boom)
    assert processor_snapshot(qwen.transformer) == before
    assert [p.requires_grad for p in qwen.transformer.parameters()] == grads


def test_sizes_off_the_packing_grid_are_refused(_qwen_loaded):
    with pytest.raises(attncontrol.ResolutionError, match="multiple of 16"):
        attncontrol.prepare_run(_qwen_loaded, PROMPT, [], height=120, width=128)


# ---------------------------------------------------------------- the command line


def test_cli_tokens_prints_the_templated_stream(qwen_dir, _qwen_loaded, capsys):
    assert main(["tokens", PROMPT, "--model", str(qwen_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:]]
    kept = _qwen_loaded.tokenizer(_qwen_loaded.prompt_template_encode.format(PROMPT)).input_ids[34:]
    assert len(rows) == len(kept)  # the positions after the drop, template suffix included
    cat = next(r for r in rows if r[1] == "\u0120cat")
    assert cat[2] == "cat" and int(cat[0]) == kept.index(_qwen_loaded.tokenizer(" cat").input_ids[0])
    assert rows[-1][1] == "\u010a" and any(r[1] == "<|im_end|>" for r in rows)


def test_cli_generate_runs_a_method_on_the_saved_folder(qwen_dir, tmp_path):
    out = tmp_path / "qwen.png"
    argv = ["generate", PROMPT, "--subjects", "cat", "dog", "--model", str(qwen_dir), "--out", str(out)]
    argv += ["--steps", "2", "--height", "128", "--width", "128", "--negative-prompt", "a bird"]
    assert main(argv) == 0
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (128, 128)
