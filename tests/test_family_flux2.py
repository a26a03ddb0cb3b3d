"""FLUX.2 [dev] (Flux2Pipeline, Mistral-3 encoder) and FLUX.2 [klein] (Flux2KleinPipeline, Qwen3 encoder): stock
equality without controls, exact joint-attention maps in double- and single-stream (parallel) blocks, subjects at
the templated positions the transformer attends to, every control, processors restored, the command line."""

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
    SynGen,
)
from attncontrol.cli import main
from attncontrol.processors.parallel import PARALLEL_ROTARY_JOINT
from attncontrol.testing import make_tiny_pipeline

from .conftest import fresh_copy, processor_snapshot, seeded

PROMPT = "a cat and a dog"
BOXES = {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}
KW = dict(max_sequence_length=96, height=128, width=128)


@pytest.fixture(scope="module")
def flux2_dirs(tmp_path_factory):
    """Both tiny pipelines saved (safetensors) and reloaded with the real loading code."""
    root = tmp_path_factory.mktemp("tiny-flux2")
    out = {}
    for family in ("flux2", "klein"):
        make_tiny_pipeline(family, seed=7).save_pretrained(root / family, safe_serialization=True)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def _loaded(flux2_dirs):
    from diffusers import DiffusionPipeline

    pipes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family, folder in flux2_dirs.items():
            pipes[family] = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
            pipes[family].set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture()
def flux2(_loaded):
    return fresh_copy(_loaded["flux2"])


@pytest.fixture()
def klein(_loaded):
    return fresh_copy(_loaded["klein"])


def _run(pipe, controls, steps=3, **kw):
    return attncontrol.generate(
        pipe,
        kw.pop("prompt", PROMPT),
        controls,
        num_inference_steps=steps,
        generator=seeded(0),
        output_type="latent",
        **{**KW, **kw},
    )


# ---------------------------------------------------------------- stock equality


@pytest.mark.parametrize("family,extra", [("flux2", {}), ("klein", {"guidance_scale": 1.0}), ("klein", {})])
def test_without_controls_it_is_exactly_the_stock_pipeline(family, extra, request):
    """dev (guidance embedding), Klein without and with CFG (its default 4.0 on a base model)."""
    pipe = request.getfixturevalue(family)
    kw = dict(num_inference_steps=3, output_type="latent", **KW, **extra)
    stock = pipe(prompt=PROMPT, generator=seeded(0), **kw).images
    ours = attncontrol.generate(pipe, PROMPT, [], generator=seeded(0), **kw).images
    assert torch.equal(ours, stock)


def test_the_adapters_and_their_guidance_rules(flux2, klein):
    from attncontrol.models import Flux2Adapter, Flux2KleinAdapter, get_adapter

    dev, kl = get_adapter(flux2), get_adapter(klein)
    assert type(dev) is Flux2Adapter and type(kl) is Flux2KleinAdapter
    assert all(la.ops is PARALLEL_ROTARY_JOINT for la in dev.layers)
    assert [la.block_index for la in dev.layers if la.kind == "cross"] == [0, 1, 2, 3]
    assert dev.default_blocks() == {"cross": (0, 1), "self": (0, 1)}
    assert not dev.uses_cfg(4.0) and kl.uses_cfg(4.0) and not kl.uses_cfg(1.0)
    klein.register_to_config(is_distilled=True)
    assert not kl.uses_cfg(4.0)
    with pytest.raises(OptionError, match="negative prompt"):
        dev.uses_cfg(4.0, "a bird")
    with pytest.raises(OptionError, match="step-distilled"):
        kl.uses_cfg(4.0, "a bird")
    with pytest.raises(OptionError, match="reference images"):
        attncontrol.prepare_run(flux2, PROMPT, [], image=[object()], **KW)


def test_a_klein_negative_prompt_becomes_the_negative_embeddings(klein):
    """The pipeline takes no negative prompt, only negative_prompt_embeds (else it encodes ""): a negative prompt
    given here is encoded by the pipeline's own encode_prompt and handed over as those."""
    kw = dict(num_inference_steps=2, output_type="latent", **KW)
    neg, _ = klein.encode_prompt("a bird", max_sequence_length=96)
    stock = klein(prompt=PROMPT, negative_prompt_embeds=neg, generator=seeded(0), **kw).images
    ours = attncontrol.generate(klein, PROMPT, [], negative_prompt="a bird", generator=seeded(0), **kw).images
    assert torch.equal(ours, stock)


# ---------------------------------------------------------------- the captured maps


def _explicit_cross_maps(pipe, layer_names, latents, run):
    """Head- and layer-averaged image->text probabilities, from explicit (N+M)^2 softmaxes in float64 computed by
    forward-pre-hooks on the attention modules, reading q/k as diffusers' processors compute them."""
    from diffusers.models.embeddings import apply_rotary_emb

    n_img = run.adapter.token_grid[0] * run.adapter.token_grid[1]
    found = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rotary = kwargs.get("image_rotary_emb", args[3] if len(args) > 3 else None)
        if hasattr(module, "to_qkv_mlp_proj"):  # Flux2ParallelSelfAttnProcessor
            fused = module.to_qkv_mlp_proj(hidden)
            q, k, _ = fused[..., : 3 * module.inner_dim].chunk(3, dim=-1)
        else:  # Flux2AttnProcessor: [text; image]
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            q = torch.cat([module.add_q_proj(context), module.to_q(hidden)], dim=1)
            k = torch.cat([module.add_k_proj(context), module.to_k(hidden)], dim=1)
        q, k = q.unflatten(-1, (-1, module.head_dim)), k.unflatten(-1, (-1, module.head_dim))
        if not hasattr(module, "to_qkv_mlp_proj"):
            m = q.shape[1] - n_img
            q = torch.cat([module.norm_added_q(q[:, :m]), module.norm_q(q[:, m:])], dim=1)
            k = torch.cat([module.norm_added_k(k[:, :m]), module.norm_k(k[:, m:])], dim=1)
        else:
            q, k = module.norm_q(q), module.norm_k(k)
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        m = q.shape[2] - n_img
        found.append(p[:, :, m:, :m].mean(1))

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


@pytest.mark.parametrize("blocks", [(1,), (2,)], ids=["double", "single"])
def test_captured_maps_equal_the_explicit_joint_softmax(flux2, blocks):
    pipe = flux2.to(torch.float64)
    control = AttendExcite(subjects=["cat", "dog"], exclude_eot=False, blocks=blocks)
    run = attncontrol.prepare_run(pipe, PROMPT, [control], num_inference_steps=3, **KW)
    latents = run.draw_latents().to(torch.float64)
    key = run.controls[0].maps.key
    names = run.engine.layer_names[key]
    assert names == [run.adapter.layers[2 * blocks[0]].name]
    with run.installed():
        run.engine.evaluate(latents, 0)
        captured = run.store.maps_of(names, key.grid)
    explicit = _explicit_cross_maps(pipe, names, latents, run)
    rows, cols = key.grid
    kept = run.store.columns
    prefix = run.ctx.text.segments[0].table(0).prefix
    assert kept.tolist() == list(range(prefix, 96 - 1))  # after the template's prefix, all but the last slot
    torch.testing.assert_close(captured.reshape(1, rows * cols, -1)[..., kept], explicit[..., kept], rtol=0, atol=1e-12)


def _reference_attention(module, hidden, context, rotary, probs_of):
    """The attention module's output recomputed explicitly in float64 with ``probs_of(scores)`` as the image
    queries' probabilities (the text queries keep the softmax), following diffusers' two processors."""
    from diffusers.models.embeddings import apply_rotary_emb

    heads = lambda x: x.unflatten(-1, (-1, module.head_dim))  # noqa: E731
    if hasattr(module, "to_qkv_mlp_proj"):
        fused = module.to_qkv_mlp_proj(hidden)
        q, k, v = (heads(x) for x in fused[..., : 3 * module.inner_dim].chunk(3, dim=-1))
        q, k = module.norm_q(q), module.norm_k(k)
        mlp = module.mlp_act_fn(fused[..., 3 * module.inner_dim :])
    else:
        q = torch.cat(
            [module.norm_added_q(heads(module.add_q_proj(context))), module.norm_q(heads(module.to_q(hidden)))], 1
        )
        k = torch.cat(
            [module.norm_added_k(heads(module.add_k_proj(context))), module.norm_k(heads(module.to_k(hidden)))], 1
        )
        v = torch.cat([heads(module.add_v_proj(context)), heads(module.to_v(hidden))], 1)
    q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores, -1)
    m = context.shape[1]  # text first, in both kinds of block
    probs = torch.cat([probs[:, :, :m], probs_of(scores[:, :, m:])], dim=2)
    out = (probs @ v).transpose(1, 2).flatten(2)
    if hasattr(module, "to_qkv_mlp_proj"):
        return module.to_out(torch.cat([out, mlp], -1))
    return module.to_out[0](out[:, m:]), module.to_add_out(out[:, :m])


@pytest.mark.parametrize("block", ["transformer_blocks.0", "single_transformer_blocks.0"])
def test_an_edited_attention_adds_its_change_at_the_right_place(flux2, block):
    """The form's edited output (the layer's own output plus the image queries' change) equals the attention
    recomputed with the edited probabilities, through the fused [attention; MLP] projection of a parallel block."""
    transformer = flux2.transformer.to(torch.float64)
    module = dict(transformer.named_modules())[f"{block}.attn"]
    g = seeded(1)
    n_img, m, dim = 16, 6, transformer.inner_dim
    ids = torch.cat([torch.zeros(m, 4), torch.cartesian_prod(*(torch.arange(s) for s in (1, 4, 4, 1)))])
    ids[:m, 3] = torch.arange(m)
    rotary = tuple(x.to(torch.float64) for x in transformer.pos_embed(ids))
    hidden = torch.randn(1, n_img, dim, generator=g, dtype=torch.float64)
    context = torch.randn(1, m, dim, generator=g, dtype=torch.float64)
    single = block.startswith("single")
    args = dict(hidden_states=torch.cat([context, hidden], 1) if single else hidden, image_rotary_emb=rotary)
    if not single:
        args["encoder_hidden_states"] = context
    bias = torch.zeros(m + n_img, dtype=torch.float64)
    bias[2] = 3.0  # more attention on text key 2

    def edit(scores, heads, offset):
        assert offset == 0  # text first
        return torch.softmax(scores + bias.to(scores.dtype), -1)

    with torch.no_grad():
        ours = PARALLEL_ROTARY_JOINT.edited(module, args, n_img, lambda: module.processor(module, **args), edit)
        ref = _reference_attention(
            module, args["hidden_states"], context, rotary, lambda s: torch.softmax(s + bias, -1)
        )
        plain = module.processor(module, **args)
    ours, ref, plain = (x if isinstance(x, tuple) else (x,) for x in (ours, ref, plain))
    for a, b in zip(ours, ref):  # the form edits float32 scores (as every form does); the rest is float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (ours[0] - plain[0]).abs().max() > 1e-3


# ---------------------------------------------------------------- subjects at the templated positions


def _pipeline_ids(pipe, family, prompt):
    """The ids the pipeline's own encode path feeds its text encoder (diffusers' code, not ours)."""
    captured = {}

    def keep(module, args, kwargs):
        captured["ids"] = kwargs["input_ids"]

    hook = pipe.text_encoder.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        pipe.encode_prompt(prompt, max_sequence_length=96)
    finally:
        hook.remove()
    return captured["ids"][0].tolist()


@pytest.mark.parametrize("family", ["flux2", "klein"])
def test_subjects_resolve_to_the_positions_the_transformer_attends_to(family, request):
    pipe = request.getfixturevalue(family)
    run = attncontrol.prepare_run(pipe, PROMPT, [AttendExcite(subjects=["cat", "dog"])], **KW)
    ids = _pipeline_ids(pipe, family, PROMPT)
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    cat, dog = run.controls[0].maps.subjects[0]
    assert [tokens[p] for p in cat] == ["\u0120cat"] and [tokens[p] for p in dog] == ["\u0120dog"]
    table = run.ctx.text.segments[0].table(0)
    assert list(table.ids) == [i for i in ids if i != pipe.tokenizer.pad_token_id]  # the templated sequence
    if family == "flux2":  # <s>, the system prompt, [INST] before the prompt
        assert tokens[:2] == ["<s>", "[SYSTEM_PROMPT]"] and "[/SYSTEM_PROMPT]" in tokens[: table.prefix]
        assert tokens[table.prefix - 1] == "[INST]" and tokens[table.last_index + 1] == "[/INST]"
    else:  # <|im_start|>user\n before, the closed turn and the opened assistant turn with an empty think after
        assert tokens[0] == "<|im_start|>" and "<think>" in tokens[table.last_index + 1 :]
    keep = run.ctx.text.keep(0, True)
    assert keep.nonzero().flatten().tolist() == list(range(table.first_index, table.last_index + 1))


# ---------------------------------------------------------------- every control


ATTRIBUTES = "a red cat and a blue dog"
# step sizes that lower each loss on these random weights (scale_factor 200 overshoots A&E's here)
CONTROLS = {
    "attend-excite": lambda: AttendExcite(subjects=["cat", "dog"], thresholds={}, scale_factor=50),
    "astar": lambda: AStar(subjects=["cat", "dog"], scale_factor=200),
    "refocus": lambda: Refocus(boxes=BOXES, schedule=((10, 100.0, 1),)),
    "attend-excite-velocity": lambda: AttendExcite(subjects=["cat", "dog"], update="velocity", velocity_scale=10),
    "divide-bind": lambda: DivideBind(subjects=["cat", "dog"], scale_factor=400, thresholds={}),
    "conform": lambda: Conform(subjects=["red cat", "blue dog"], scale_factor=400, refinement_steps=()),
    "syngen": lambda: SynGen(subjects=["red cat", "blue dog"], step_size=50),
    "boxdiff": lambda: BoxDiff(boxes=BOXES, scale_factor=50, thresholds={}),
    "initno": lambda: InitNO(subjects=["cat", "dog"], optimise=False, scale_factor=50),
}


def _one_step(pipe, control, step=1):
    prompt = ATTRIBUTES if control.method in ("conform", "syngen") else PROMPT
    run = attncontrol.prepare_run(pipe, prompt, [control], num_inference_steps=10, generator=seeded(0), **KW)
    z = run.draw_latents()
    with run.installed():
        before = run.engine.evaluate(z, step).objective
        z2, record = run.guide(z, step)
        if getattr(control, "update", None) == "velocity":  # the shift goes to the next latents: measure it here
            z2 = z2 - run.engine.take_deferred(step)
        after = run.engine.evaluate(z2, step).objective
    return before.item(), after.item(), z, z2


@pytest.mark.parametrize("name", list(CONTROLS))
@pytest.mark.parametrize("family", ["flux2", "klein"])
@pytest.mark.slow
def test_each_control_lowers_its_loss(family, name, request):
    pipe = request.getfixturevalue(family)
    before, after, z, z2 = _one_step(pipe, CONTROLS[name]())
    assert not torch.equal(z, z2)
    assert after < before


def test_attend_and_excite_lowers_its_loss_on_dev(flux2):
    before, after, z, z2 = _one_step(flux2, CONTROLS["attend-excite"](), step=0)
    assert z.ndim == 4 and after < before  # step 0: the latents as drawn (unpacked), the pipeline packs them


@pytest.mark.parametrize("family,extra", [("flux2", {}), ("klein", {})])
def test_regulate_raises_the_targets_attention(family, extra, request):
    """Klein runs CFG by default: the edit reaches the conditional forward only (the first one)."""
    pipe = request.getfixturevalue(family)
    out = _run(pipe, [Regulate(subjects=["cat", "dog"], iterations=5)], steps=3, **extra)
    stats = out.trace[0].edits["regulate"]
    assert stats["quantile_after"] > stats["quantile_before"]
    plain = _run(pipe, [], steps=3, **extra)
    assert (out.images - plain.images).abs().max() > 1e-5


def test_all_controls_compose_and_the_observer_records(klein):
    controls = [
        AttendExcite(subjects=["cat", "dog"]),
        AStar(subjects=["cat", "dog"]),
        Refocus(boxes=BOXES),
        Regulate(subjects=["cat", "dog"], iterations=3),
    ]
    out = _run(klein, controls, steps=2, attention=True)
    assert set(out.trace[0].losses) == {"attend-excite", "astar", "refocus"} and out.trace[0].edits["regulate"]
    assert out.attention.maps.shape == (2, 1, 2, 8, 8) and torch.isfinite(out.attention.maps).all()


def test_processors_restored_after_an_error(flux2):
    before = processor_snapshot(flux2.transformer)
    grads = [p.requires_grad for p in flux2.transformer.parameters()]

    def boom(p, i, t, kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(flux2, [AttendExcite(subjects=["cat", "dog"]), Regulate(subjects=["cat"])], callback_on_step_end=boom)
    assert processor_snapshot(flux2.transformer) == before
    assert [p.requires_grad for p in flux2.transformer.parameters()] == grads


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("family", ["flux2", "klein"])
def test_tokens_prints_the_templated_stream(flux2_dirs, family, capsys):
    assert main(["tokens", PROMPT, "--model", str(flux2_dirs[family])]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    cat = next(r for r in rows if r[1:] == ["\u0120cat", "cat"])
    first = "[SYSTEM_PROMPT]" if family == "flux2" else "<|im_start|>"
    assert first in out and int(cat[0]) > 3  # the chat template's tokens come first


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux2", "klein"])
def test_generate_runs_on_the_saved_folder(flux2_dirs, family, tmp_path, capsys):
    out = tmp_path / f"{family}.png"
    args = ["generate", PROMPT, "--model", str(flux2_dirs[family]), "--out", str(out)]
    args += ["--subjects", "cat", "dog", "--methods", "attend-excite", "--steps", "2", "--height", "128"]
    args += ["--width", "128"]
    assert main(args) == 0, capsys.readouterr().err
    assert out.is_file()


def test_the_width_config_is_flux2_devs_block_width():
    """FLUX2_WIDTH_CONFIG: the transformer's own arguments, at FLUX.2 [dev]'s width (48 x 128, Mistral-3's 3 x
    5120 text features), with few blocks (not built here: its blocks alone are gigabytes)."""
    import inspect

    from diffusers import Flux2Transformer2DModel

    from attncontrol.testing import FLUX2_WIDTH_CONFIG as cfg

    assert set(cfg) <= set(inspect.signature(Flux2Transformer2DModel.__init__).parameters)
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 6144 and cfg["joint_attention_dim"] == 3 * 5120
    assert sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"]
