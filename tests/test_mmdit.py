"""SD3 / SD3.5 and FLUX: stock equality without controls, exact joint-attention maps without the full matrix,
subjects in every text stream, every control on both families, processors restored after errors."""

import math

import pytest
import torch

import attncontrol
from attncontrol import AStar, AttendExcite, Refocus, Regulate, SubjectError
from attncontrol.processors.joint import ROTARY_JOINT, logsumexp_keys, text_probs

from .conftest import processor_snapshot, seeded

PROMPT = "a cat and a dog"
BOXES = {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}
KW = {
    "sd3": dict(max_sequence_length=16),
    "sd35": dict(max_sequence_length=16),
    "flux": dict(max_sequence_length=16, height=128, width=128),
}


def _run(pipe, family, controls, steps=3, **kw):
    return attncontrol.generate(
        pipe,
        kw.pop("prompt", PROMPT),
        controls,
        num_inference_steps=steps,
        generator=seeded(0),
        output_type="latent",
        **{**KW[family], **kw},
    )


# ---------------------------------------------------------------- the joint softmax, exactly


def test_text_probabilities_equal_an_explicit_softmax_values_and_gradients():
    """P = exp(q.k_text * s - lse(all keys)) through the fused log-sum-exp, in float64, against the explicit softmax
    over all N + M keys: the values and the gradients with respect to q and to every key."""
    g = seeded(0)
    b, h, n, m, d = 2, 3, 12, 7, 8
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, n + m, d, generator=g, dtype=torch.float64, requires_grad=True)
    cols = torch.tensor([1, 2, 5])
    weights = torch.randn(b, h, n, len(cols), generator=g, dtype=torch.float64)
    scale = 1 / math.sqrt(d)

    probs, mass = text_probs(q, k, n, cols, scale, m)
    explicit = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    torch.testing.assert_close(probs, explicit[..., n + cols], rtol=0, atol=1e-12)
    torch.testing.assert_close(mass, explicit[..., n:].sum(-1), rtol=0, atol=1e-12)

    (gq, gk) = torch.autograd.grad((probs * weights).sum() + mass.sum(), [q, k])
    (eq, ek) = torch.autograd.grad((explicit[..., n + cols] * weights).sum() + explicit[..., n:].sum(), [q, k])
    torch.testing.assert_close(gq, eq, rtol=0, atol=1e-10)
    torch.testing.assert_close(gk, ek, rtol=0, atol=1e-10)
    assert gq.abs().max() > 1e-3 and gk.abs().max() > 1e-3  # the check is not vacuous


def test_logsumexp_fallback_path_is_exact(monkeypatch):
    """Without a fused kernel (other devices), the chunked log-sum-exp gives the same values."""
    import attncontrol.processors.joint as joint

    q, k = torch.randn(1, 2, 9, 4, dtype=torch.float64), torch.randn(1, 2, 11, 4, dtype=torch.float64)
    fused = logsumexp_keys(q, k, 0.5)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None, raising=False)
    chunked = joint._lse_forward(q, k, 0.5, chunk=4)
    torch.testing.assert_close(chunked, fused, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked, torch.logsumexp(q @ k.transpose(-1, -2) * 0.5, -1), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- stock equality


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_without_controls_it_is_exactly_the_stock_pipeline(family, request):
    pipe = request.getfixturevalue(family)
    kw = dict(num_inference_steps=3, output_type="latent", **KW[family])
    stock = pipe(PROMPT, generator=seeded(0), **kw).images
    ours = attncontrol.generate(pipe, PROMPT, [], generator=seeded(0), **kw).images
    assert torch.equal(ours, stock)


def test_flux_true_cfg_without_controls_is_the_stock_pipeline(flux):
    kw = dict(num_inference_steps=2, output_type="latent", true_cfg_scale=2.0, negative_prompt="a bird", **KW["flux"])
    stock = flux(PROMPT, generator=seeded(0), **kw).images
    ours = attncontrol.generate(flux, PROMPT, [], generator=seeded(0), **kw).images
    assert torch.equal(ours, stock)


def test_the_adapters_give_their_layers_their_familys_form(sd3, sd35, flux):
    """The family picks the attention form of each layer (SD3/SD3.5: image tokens first; FLUX: rotary, text first,
    double- and single-stream blocks alike); the capture processor never picks one."""
    from attncontrol.models import get_adapter
    from attncontrol.processors.joint import JOINT

    for pipe, form in ((sd3, JOINT), (sd35, JOINT), (flux, ROTARY_JOINT)):
        layers = get_adapter(pipe).layers
        assert layers and all(la.ops is form for la in layers), type(pipe).__name__
    assert any(la.block.startswith("single_transformer_blocks") for la in get_adapter(flux).layers)


# ---------------------------------------------------------------- the captured maps


def _explicit_cross_maps(pipe, family, layer_names, latents, step=0, text_only=False):
    """Head- and layer-averaged image->text probabilities at ``step``, from explicit (N+M)^2 softmaxes computed
    by hooks on the attention modules (independent of the capture path)."""
    from attncontrol.processors.joint import JOINT

    run = attncontrol.prepare_run(pipe, PROMPT, [], num_inference_steps=3, guidance_scale=1.0, **KW[family])
    adapter = run.adapter
    ops = ROTARY_JOINT if family == "flux" else JOINT
    grid = adapter.grid(adapter.layers[0], run.ctx.latent_hw)
    n_img = grid[0] * grid[1]
    found = []

    def hook(module, args, kwargs):
        named = dict(kwargs)
        if args:
            named["hidden_states"] = args[0]
        q, k, text_len = ops.query_key(module, named)
        if text_len == 0:
            text_len = q.shape[2] - n_img
        img, start = ops.split(q.shape[2], text_len)
        if text_only:
            k = k[:, :, start : start + text_len]
            start = 0
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        found.append(p[:, :, img, start : start + text_len].mean(1))

    modules = dict(pipe.transformer.named_modules())
    handles = [
        modules[n.removesuffix(".processor")].register_forward_pre_hook(hook, with_kwargs=True) for n in layer_names
    ]
    try:
        with torch.no_grad():
            adapter.guidance_forward(latents, run.timesteps[step], run.cond)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(found).mean(0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_captured_maps_equal_the_explicit_joint_softmax(family, request):
    pipe = request.getfixturevalue(family).to(torch.float64)
    control = AttendExcite(subjects=["cat", "dog"], exclude_eot=False)  # all text columns kept
    run = attncontrol.prepare_run(pipe, PROMPT, [control], num_inference_steps=3, guidance_scale=1.0, **KW[family])
    latents = run.draw_latents().to(torch.float64)
    key = run.controls[0].maps.key
    names = run.engine.layer_names[key]
    with run.installed():
        run.engine.evaluate(latents, 0)
        captured = run.store.maps_of(names, key.grid)
    explicit = _explicit_cross_maps(pipe, family, names, latents)
    rows, cols = key.grid
    kept = run.store.columns  # diffusers' [1:-1] rule per text stream: all but a start token and the last slot
    dropped = [0, 76, 92] if family == "sd3" else [15]  # SD3: CLIP's SOT and last slot, T5's last slot; FLUX: T5's
    assert sorted(set(range(explicit.shape[-1])) - set(kept.tolist())) == dropped
    torch.testing.assert_close(captured.reshape(1, rows * cols, -1)[..., kept], explicit[..., kept], rtol=0, atol=1e-12)
    assert len(names) == (2 if family == "flux" else 4)  # FLUX: the double-stream blocks by default; SD3: all


def test_only_the_needed_text_columns_are_computed(sd3):
    """With the default (prompt tokens only) the joint layers give just those columns; the rest of the token
    axis stays empty, and the kept ones match a capture of every column."""
    both = {}
    for exclude in (True, False):
        run = attncontrol.prepare_run(
            sd3,
            PROMPT,
            [AttendExcite(subjects=["cat", "dog"], exclude_eot=exclude)],
            num_inference_steps=3,
            guidance_scale=1.0,
            generator=seeded(0),
            **KW["sd3"],
        )
        with run.installed():
            run.engine.evaluate(run.draw_latents(), 0)
            key = run.controls[0].maps.key
            both[exclude] = (run.store.columns, run.store.maps_of(run.engine.layer_names[key], key.grid))
    cols, kept = both[True]
    table = attncontrol.tokenize(sd3.tokenizer, PROMPT)
    t5 = attncontrol.tokenize(sd3.tokenizer_3, PROMPT, 16)
    expected = [*range(1, table.last_index + 1), *(77 + p for p in range(t5.first_index, t5.last_index + 1))]
    assert cols.tolist() == expected
    assert len(both[False][0]) == 77 + 16 - 3  # diffusers' rule keeps all but CLIP's SOT and each last slot
    torch.testing.assert_close(kept[..., cols], both[False][1][..., cols], rtol=1e-6, atol=1e-7)
    mask = torch.ones(kept.shape[-1], dtype=torch.bool)
    mask[cols] = False
    assert kept[..., mask].abs().max() == 0


def test_text_normalisation_equals_a_softmax_over_the_text_keys(sd3):
    sd3.to(torch.float64)
    control = AttendExcite(subjects=["cat", "dog"], exclude_eot=False, normalise="text")
    run = attncontrol.prepare_run(
        sd3, PROMPT, [control], num_inference_steps=3, guidance_scale=1.0, generator=seeded(0), **KW["sd3"]
    )
    latents = run.draw_latents()
    key = run.controls[0].maps.key
    names = run.engine.layer_names[key]
    with run.installed():
        run.engine.evaluate(latents, 0)
        text = run.store.maps_of(names, key.grid, "text")
        full = run.store.maps_of(names, key.grid, "all")
    explicit = _explicit_cross_maps(sd3, "sd3", names, latents, text_only=True)
    cols = run.store.columns
    torch.testing.assert_close(text.reshape(1, 64, -1)[..., cols], explicit[..., cols], rtol=0, atol=1e-12)
    assert (text[..., cols] - full[..., cols]).abs().max() > 1e-3  # the image keys take part of the joint softmax


# ---------------------------------------------------------------- subjects in every text stream


def test_sd3_subjects_are_resolved_in_clip_and_t5(sd3):
    run = attncontrol.prepare_run(sd3, PROMPT, [AttendExcite(subjects=["cat", "dog"])], **KW["sd3"])
    t5 = attncontrol.tokenize(sd3.tokenizer_3, PROMPT, 16)
    cat_t5 = t5.rows()[[r.word for r in t5.rows()].index("cat")].index
    cat, dog = run.controls[0].maps.subjects[0]
    assert cat[0] == 2 and cat[1:] == (77 + cat_t5,)
    assert dog[0] == 5 and all(p >= 77 for p in dog[1:])


def test_an_sd3_token_index_is_a_clip_index_and_the_same_word_in_t5(sd3):
    """An index names a token of the first table (CLIP: 0 is its start token); in T5, which has no start token and
    so numbers every word one lower, it must mean the same word, not the same number (issue #30 item 6)."""
    prompt = "a red car and a blue bench"
    kw = {k: v for k, v in KW["sd3"].items()}
    clip = sd3.tokenizer.convert_ids_to_tokens(sd3.tokenizer(prompt).input_ids)
    t5 = sd3.tokenizer_3.convert_ids_to_tokens(sd3.tokenizer_3(prompt).input_ids)
    assert clip[3] == "car</w>" and clip[7] == "bench</w>" and t5[3] == "\u2581and"  # the same number, other words
    want = [(3, 77 + t5.index("\u2581car")), (7, 77 + t5.index("\u2581bench"))]
    by_index = attncontrol.prepare_run(sd3, prompt, [AttendExcite(subjects=[3, 7])], **kw)
    by_word = attncontrol.prepare_run(sd3, prompt, [AttendExcite(subjects=["car", "bench"])], **kw)
    assert by_index.controls[0].maps.subjects[0] == want == by_word.controls[0].maps.subjects[0]
    # a repeated word keeps its occurrence: index 5 is the second "a"
    second_a = attncontrol.prepare_run(sd3, prompt, [AttendExcite(subjects=[5, 7])], **kw)
    assert second_a.controls[0].maps.subjects[0][0] == (5, 77 + [i for i, t in enumerate(t5) if t == "\u2581a"][1])
    with pytest.raises(SubjectError, match="token index 9 is not a prompt token"):
        attncontrol.prepare_run(sd3, prompt, [AttendExcite(subjects=[3, 9])], **kw)


def test_flux_subjects_use_the_t5_word_rule(flux):
    run = attncontrol.prepare_run(
        flux, "a cat resting on grass", [AttendExcite(subjects=["resting", "cat"])], **KW["flux"]
    )
    table = attncontrol.tokenize(flux.tokenizer_2, "a cat resting on grass", 16)
    rows = table.rows()
    resting = [r.index for r in rows if r.word == "resting"]
    assert run.controls[0].maps.subjects[0][0] == tuple(resting)
    assert table.prefix == 0 and rows[0].token.startswith("\u2581")  # no start token; word-start marker


def test_a_missing_subject_names_it_and_shows_each_table(sd3):
    with pytest.raises(SubjectError) as err:
        attncontrol.generate(sd3, PROMPT, [AttendExcite(subjects=["cat", "horse"])], **KW["sd3"])
    message = str(err.value)
    assert "'horse'" in message and "<|startoftext|>" in message


# ---------------------------------------------------------------- every control on both families


CONTROLS = {
    "attend-excite": lambda: AttendExcite(subjects=["cat", "dog"], thresholds={}, scale_factor=200),
    "astar": lambda: AStar(subjects=["cat", "dog"], scale_factor=200),
    "refocus": lambda: Refocus(boxes=BOXES, schedule=((10, 100.0, 1),)),
    "attend-excite-velocity": lambda: AttendExcite(subjects=["cat", "dog"], update="velocity", velocity_scale=20),
}


@pytest.mark.parametrize("name", list(CONTROLS))
@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
@pytest.mark.slow
def test_each_control_lowers_its_loss(family, name, request):
    pipe = request.getfixturevalue(family)
    control = CONTROLS[name]()
    run = attncontrol.prepare_run(
        pipe, PROMPT, [control], num_inference_steps=10, guidance_scale=1.0, generator=seeded(0), **KW[family]
    )
    z = run.draw_latents()  # the step sizes lower the loss from each of the noises of seeds 0-7, not only this one
    with run.installed():
        before = run.engine.evaluate(z, 1).losses[control.method]
        z2, record = run.guide(z, 1)
        if name.endswith("velocity"):  # the shift goes to the next latents: apply it here to measure it
            z2 = z2 - run.engine.take_deferred(1)
        after = run.engine.evaluate(z2, 1).losses[control.method]
    assert not torch.equal(z, z2)
    assert after.item() < before.item()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_regulate_raises_the_targets_attention_and_edits_only_the_conditional_branch(family, request):
    pipe = request.getfixturevalue(family)
    extra = dict(true_cfg_scale=2.0, negative_prompt="a bird") if family == "flux" else {}
    out = _run(pipe, family, [Regulate(subjects=["cat", "dog"], iterations=5)], steps=4, **extra)
    stats = out.trace[0].edits["regulate"]
    assert stats["quantile_after"] > stats["quantile_before"]
    plain = _run(pipe, family, [], steps=4, **extra)
    assert (out.images - plain.images).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_all_controls_compose_and_the_observer_records(family, request):
    pipe = request.getfixturevalue(family)
    controls = [
        AttendExcite(subjects=["cat", "dog"]),
        AStar(subjects=["cat", "dog"]),
        Refocus(boxes=BOXES),
        Regulate(subjects=["cat", "dog"], iterations=3),
    ]
    out = _run(pipe, family, controls, steps=3, attention=True)
    assert set(out.trace[0].losses) == {"attend-excite", "astar", "refocus"} and out.trace[0].edits["regulate"]
    assert out.attention.maps.shape == (3, 1, 2, 8, 8) and torch.isfinite(out.attention.maps).all()


def test_flux_observer_records_only_the_conditional_forward(flux):
    """With true CFG the negative branch is a second forward: the observer keeps the first (the positive)."""
    kw = dict(attention=["cat", "dog"], steps=1)
    plain = _run(flux, "flux", [], **kw).attention.maps
    cfg = _run(flux, "flux", [], true_cfg_scale=3.0, negative_prompt="a bird", **kw).attention.maps
    torch.testing.assert_close(cfg, plain, rtol=0, atol=0)


def test_blocks_choose_the_layers_and_the_guidance_pass_stops_after_the_last(sd3):
    """blocks=(0, 1): only those joint blocks are captured and no later block runs in a guidance pass."""
    calls = []
    hook = sd3.transformer.transformer_blocks[2].register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    try:
        out = _run(
            sd3,
            "sd3",
            [AttendExcite(subjects=["cat", "dog"], blocks=(0, 1), thresholds={})],
            steps=2,
            guidance_scale=1.0,
        )
    finally:
        hook.remove()
    assert out.guided_steps and calls == [False, False]  # the two denoising forwards only
    with pytest.raises(ValueError, match=r"blocks \[7\] have no cross-attention layer.*\[0, 1, 2, 3\]"):
        _run(sd3, "sd3", [AttendExcite(subjects=["cat"], blocks=(7,))])


def test_processors_restored_after_an_error(sd3, flux):
    for pipe, family in ((sd3, "sd3"), (flux, "flux")):
        before = processor_snapshot(pipe.transformer)
        grads = [p.requires_grad for p in pipe.transformer.parameters()]

        def boom(p, i, t, kwargs):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            _run(
                pipe,
                family,
                [AttendExcite(subjects=["cat", "dog"]), Regulate(subjects=["cat"])],
                callback_on_step_end=boom,
            )
        assert processor_snapshot(pipe.transformer) == before
        assert [p.requires_grad for p in pipe.transformer.parameters()] == grads


@pytest.mark.slow
def test_velocity_rule_is_refused_on_a_non_flow_model(sd1):
    with pytest.raises(ValueError, match="flow-matching"):
        attncontrol.generate(sd1, PROMPT, [AttendExcite(subjects=["cat"], update="velocity")])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_checkpointing_gives_the_same_images(family, request):
    """Checkpointed guidance passes (joint blocks before the last captured one recomputed in the backward):
    the same latents as without."""
    pipe = request.getfixturevalue(family)
    controls = [
        AttendExcite(subjects=["cat", "dog"], thresholds={0: 0.9}, max_refinement_steps=2),
        Refocus(boxes=BOXES),
    ]
    plain = _run(pipe, family, controls, steps=2).images
    ckpt = _run(pipe, family, controls, steps=2, checkpointing=True).images
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-6)
    assert (plain - _run(pipe, family, [], steps=2).images).abs().max() > 1e-4
