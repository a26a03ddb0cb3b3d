"""SANA (``SanaPipeline``): stock equality without controls (CFG on and off, resolution binning), captured
cross-attention maps equal an explicit masked softmax, subjects at the positions the transformer attends to (the
instruction window), every control on the tiny model (or a typed refusal: linear self-attention has no map),
processors restored after an error, and the command line on a saved folder."""

import inspect
import math

import pytest
import torch

import attncontrol
from attncontrol import AStar, AttendExcite, BoxDiff, Conform, DivideBind, InitNO, Refocus, Regulate, SynGen
from attncontrol.errors import OptionError, ResolutionError
from attncontrol.models import SanaAdapter, get_adapter
from attncontrol.tokens import TailWindow, tokenize

from .conftest import processor_snapshot, seeded

PROMPT = "A cat and a dog"
BOXES = {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}
KW = dict(height=256, width=256, max_sequence_length=24)


def _load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory):
    from attncontrol.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sana") / "sana", family="sana", seed=7)


@pytest.fixture(scope="module")
def sana(sana_dir):
    return _load(sana_dir)


@pytest.fixture(scope="module")
def sana_qk(tmp_path_factory):
    """SANA 1.5's layout: q/k RMS norms over all heads in every attention."""
    from attncontrol.testing import make_tiny_sana_pipeline

    folder = tmp_path_factory.mktemp("tiny-sana-qk") / "sana"
    make_tiny_sana_pipeline(seed=8, qk_norm="rms_norm_across_heads").save_pretrained(folder, safe_serialization=True)
    return _load(folder)


def _run(pipe, controls, steps=3, **kw):
    return attncontrol.generate(
        pipe, kw.pop("prompt", PROMPT), controls, num_inference_steps=steps, generator=seeded(0),
        output_type="latent", **{**KW, **kw},
    )  # fmt: skip


# ---------------------------------------------------------------- the stock pipeline, bit for bit


@pytest.mark.parametrize("size", [(512, 512), (512, 544)])
@pytest.mark.parametrize("guidance_scale", [4.5, 1.0])
def test_without_controls_it_is_exactly_the_stock_pipeline(sana, guidance_scale, size):
    """512x544 is binned (to 480x512): the run's latents are drawn on the binned grid, as the pipeline's."""
    kw = dict(num_inference_steps=3, guidance_scale=guidance_scale, height=size[0], width=size[1])
    stock = sana(PROMPT, generator=seeded(0), output_type="latent", **kw).images
    ours = attncontrol.generate(sana, PROMPT, [], generator=seeded(0), output_type="latent", **kw).images
    assert torch.equal(stock, ours)
    if size == (512, 544):
        assert stock.shape[-2:] == (15, 16)


def test_without_binning_the_grid_is_the_size(sana):
    kw = dict(num_inference_steps=2, guidance_scale=4.5, height=512, width=544, use_resolution_binning=False)
    stock = sana(PROMPT, generator=seeded(0), output_type="latent", **kw).images
    ours = attncontrol.generate(sana, PROMPT, [], generator=seeded(0), output_type="latent", **kw).images
    assert stock.shape[-2:] == (16, 17) and torch.equal(stock, ours)


def test_the_adapter_facts(sana):
    adapter = get_adapter(sana)
    assert (
        isinstance(adapter, SanaAdapter)
        and adapter.flow_matching
        and adapter.attention_kwargs_name == ("attention_kwargs")
    )
    assert [la.kind for la in adapter.layers] == ["cross"] * 3 and adapter.default_blocks() == {"cross": (0, 1, 2)}
    assert adapter.grid(adapter.layers[0], (16, 15)) == (16, 15) and adapter.input_scale(500) == 1.0
    assert adapter.start_noise_sigma() == 1.0 and adapter.default_guidance_scale() == 4.5
    assert adapter.uses_cfg(4.5) and not adapter.uses_cfg(1.0) and adapter.cfg_batched(True)
    assert "self" in adapter.missing_kinds() and "linear" in adapter.missing_kinds()["self"]


# ---------------------------------------------------------------- maps: an explicit masked softmax


def _explicit_cross_maps(pipe, names, latents, run, step=0):
    """Per layer, softmax(q k^T / sqrt(d) + mask bias) in float64 from forward-pre-hooks on the attention modules,
    q/k normed as the layer's own processor does (diffusers ``SanaAttnProcessor2_0.__call__``); heads averaged."""
    found = []

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]  # SanaTransformerBlock.forward passes it by position
        e, bias = kwargs["encoder_hidden_states"], kwargs["attention_mask"]
        q, k = module.to_q(h), module.to_k(e)
        if module.norm_q is not None:
            q, k = module.norm_q(q), module.norm_k(k)
        b, heads = q.shape[0], module.heads
        q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, None], dim=-1)
        found.append(p.mean(1))

    modules = dict(pipe.transformer.named_modules())
    handles = [modules[n.removesuffix(".processor")].register_forward_pre_hook(hook, with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            run.adapter.guidance_forward(latents, run.timesteps[step], run.cond)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(found).mean(0)


@pytest.mark.parametrize("qk", [False, True])
def test_captured_maps_equal_the_explicit_masked_softmax(sana, sana_qk, qk):
    pipe = (sana_qk if qk else sana).to(torch.float64)
    try:
        control = AttendExcite(subjects=["cat", "dog"], exclude_eot=False)
        run = attncontrol.prepare_run(pipe, PROMPT, [control], num_inference_steps=3, guidance_scale=1.0, **KW)
        latents = run.draw_latents().to(torch.float64)
        key = run.controls[0].maps.key
        names = run.engine.layer_names[key]
        with run.installed():
            run.engine.evaluate(latents, 0)
            captured = run.store.maps_of(names, key.grid)
        explicit = _explicit_cross_maps(pipe, names, latents, run)
    finally:
        pipe.to(torch.float32)
    rows, cols = key.grid
    kept = run.store.columns
    mask = run.cond["encoder_attention_mask"][0].bool()
    assert len(names) == 3 and explicit.shape[-1] == 24
    assert torch.equal(explicit[..., ~mask], torch.zeros_like(explicit[..., ~mask]))  # masked keys: probability 0
    torch.testing.assert_close(captured.reshape(1, rows * cols, -1)[..., kept], explicit[..., kept], rtol=0, atol=1e-12)
    assert explicit[..., mask].sum(-1).sub(1).abs().max() < 1e-12


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_the_classic_form_is_the_sana_cross_attention_processor(qk_norm):
    """The layer's output through CLASSIC's explicit probabilities equals ``SanaAttnProcessor2_0``'s (float64),
    with the key mask as the transformer passes it (a -10000 bias) and q/k norms over all heads."""
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    from attncontrol.processors.classic import CLASSIC

    torch.manual_seed(0)
    attn = SanaTransformerBlock(16, 2, 8, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                cross_attention_dim=16, qk_norm=qk_norm).attn2  # fmt: skip
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms' scales off 1
    attn = attn.double().eval()
    g = seeded(1)
    hidden = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64)
    bias = ((1 - keep) * -10000.0).unsqueeze(1)
    seen = []
    with torch.no_grad():
        theirs = attn.processor(attn, hidden, encoder_hidden_states=text, attention_mask=bias)
        ours = CLASSIC.explicit(attn, hidden, text, bias, None, on_probs=lambda p, h: seen.append(p))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    probs = seen[0].view(2, 2, 6, 5)
    assert torch.equal(probs[0, ..., 3:], torch.zeros_like(probs[0, ..., 3:])) and probs[1, ..., 4].abs().max() == 0


# ---------------------------------------------------------------- subjects: the instruction window


def _pipeline_tokens(pipe, prompt, length):
    """The tokens the transformer attends to, as ``SanaPipeline._get_gemma_prompt_embeds`` and ``encode_prompt``
    build them: the instruction before the lowercased prompt, padded, then ``[0] + last (length - 1)``."""
    tok = pipe.tokenizer
    chi = "\n".join(inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default)
    n_chi = len(tok.encode(chi))
    ids = tok(chi + prompt.lower().strip(), padding="max_length", max_length=n_chi + length - 2, truncation=True)
    select = [0, *range(n_chi + length - 2 - (length - 1), n_chi + length - 2)]
    return [ids.input_ids[i] for i in select], [ids.attention_mask[i] for i in select]


@pytest.mark.parametrize("length", [24, 300])
def test_subjects_resolve_to_the_positions_the_transformer_attends_to(sana, length):
    ids, mask = _pipeline_tokens(sana, PROMPT, length)
    run = attncontrol.prepare_run(
        sana, PROMPT, [AttendExcite(subjects=["cat", "Dog", "a#2"])], num_inference_steps=2,
        max_sequence_length=length, height=256, width=256,
    )  # fmt: skip
    positions = run.ctx.subjects_per_image(["cat", "Dog", "a#2"])[0]
    tokens = sana.tokenizer.convert_ids_to_tokens(ids)
    assert [tokens[p] for (p,) in positions] == ["\u2581cat", "\u2581dog", "\u2581a"]
    assert positions == [(2,), (5,), (4,)] and tokens[0] == "<bos>" and tokens[1] == "\u2581a"
    assert run.cond["encoder_attention_mask"][0].tolist() == mask  # the mask the run hands the transformer
    table = tokenize(run.ctx.text.segments[0].tokenizer, PROMPT, length)
    assert list(table.ids) == ids[: sum(mask)] and table.prefix == 1 and table.suffix == 0


def test_the_cli_table_uses_the_pipelines_instruction(sana, sana_dir):
    from attncontrol.loading import STREAM_TEMPLATES, load_token_streams

    ((label, offset, tok),) = load_token_streams(str(sana_dir))
    assert (label, offset) == ("Gemma", 0)
    default = inspect.signature(type(sana).__call__).parameters["complex_human_instruction"].default
    window = STREAM_TEMPLATES["SanaPipeline"]["tokenizer"].window
    assert window == TailWindow(1, 300, "\n".join(default), 298)
    ids, mask = _pipeline_tokens(sana, PROMPT, 300)
    assert tok(PROMPT).input_ids == ids[: sum(mask)]


def test_a_long_prompt_is_cut_where_the_pipeline_cuts_it(sana):
    prompt = " ".join(["cat"] * 30) + " and a dog"
    ids, mask = _pipeline_tokens(sana, prompt, 24)
    assert all(mask)  # the pipeline kept 24 of its tokens: the dog is past them
    with pytest.raises(attncontrol.SubjectError, match="beyond the text encoder's limit"):
        attncontrol.prepare_run(sana, prompt, [AttendExcite(subjects=["dog"])], num_inference_steps=2, **KW)


def test_without_an_instruction_the_prompt_alone(sana):
    kw = dict(KW, complex_human_instruction=None)
    run = attncontrol.prepare_run(sana, PROMPT, [AttendExcite(subjects=["cat"])], num_inference_steps=2, **kw)
    ids = sana.tokenizer(PROMPT.lower(), padding="max_length", max_length=24).input_ids
    ((p,),) = run.ctx.subjects_per_image(["cat"])[0]
    assert sana.tokenizer.convert_ids_to_tokens(ids)[p] == "\u2581cat"
    stock = sana(PROMPT, generator=seeded(0), output_type="latent", num_inference_steps=2, **kw).images
    assert torch.equal(stock, _run(sana, [], steps=2, complex_human_instruction=None).images)


def test_clean_caption_is_refused(sana):
    with pytest.raises(OptionError, match="clean_caption"):
        _run(sana, [AttendExcite(subjects=["cat"])], clean_caption=True)


# ---------------------------------------------------------------- controls

CONTROLS = {
    "attend-excite": lambda: AttendExcite(subjects=["cat", "dog"], thresholds={}, scale_factor=200),
    "astar": lambda: AStar(subjects=["cat", "dog"], scale_factor=200),
    "attend-excite-velocity": lambda: AttendExcite(subjects=["cat", "dog"], update="velocity", velocity_scale=20),
    "divide-bind": lambda: DivideBind(subjects=["cat", "dog"]),
    # attribute-noun groups: with one token per group, NT-Xent has no positive pair and SynGen no attribute
    "conform": lambda: Conform(subjects=["red cat", "blue dog"]),
    "syngen": lambda: SynGen(subjects=["red cat", "blue dog"]),
    "boxdiff": lambda: BoxDiff(boxes=BOXES),
}


def _lowers(pipe, control, velocity=False):
    prompt = "a red cat and a blue dog" if control.method in ("conform", "syngen") else PROMPT
    run = attncontrol.prepare_run(
        pipe, prompt, [control], num_inference_steps=10, guidance_scale=1.0, generator=seeded(0), **KW
    )
    z = run.draw_latents()
    with run.installed():
        before = run.engine.evaluate(z, 1).losses[control.method]
        z2, _ = run.guide(z, 1)
        if velocity:  # the shift goes to the next latents: apply it here to measure it
            z2 = z2 - run.engine.take_deferred(1)
        after = run.engine.evaluate(z2, 1).losses[control.method]
    assert not torch.equal(z, z2)
    assert after.item() < before.item()


def test_attend_excite_lowers_its_loss(sana):
    _lowers(sana, CONTROLS["attend-excite"]())


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CONTROLS if n != "attend-excite"])
def test_each_control_lowers_its_loss(sana, name):
    _lowers(sana, CONTROLS[name](), velocity=name.endswith("velocity"))


@pytest.mark.parametrize(
    "control", [lambda: Refocus(boxes=BOXES), lambda: InitNO(subjects=["cat", "dog"])], ids=["refocus", "initno"]
)
def test_methods_that_read_self_attention_are_refused_with_the_reason(sana, control):
    before = processor_snapshot(sana.transformer)
    with pytest.raises(ResolutionError, match="linear attention.*no image->image attention map"):
        _run(sana, [control()])
    assert processor_snapshot(sana.transformer) == before


def test_regulate_raises_the_targets_attention(sana):
    out = _run(sana, [Regulate(subjects=["cat", "dog"], iterations=5)], steps=3)
    stats = out.trace[0].edits["regulate"]
    assert stats["quantile_after"] > stats["quantile_before"]
    plain = _run(sana, [], steps=3)
    assert (out.images - plain.images).abs().max() > 1e-4


@pytest.mark.slow
def test_controls_compose_and_the_observer_records(sana):
    controls = [
        AttendExcite(subjects=["cat", "dog"]),
        AStar(subjects=["cat", "dog"]),
        BoxDiff(boxes=BOXES),
        Regulate(subjects=["cat", "dog"], iterations=3),
    ]
    out = _run(sana, controls, steps=3, attention=True)
    assert set(out.trace[0].losses) == {"attend-excite", "astar", "boxdiff"} and out.trace[0].edits["regulate"]
    # 256x256 is binned to 512x512 (the 512 px bins of a sample_size 16 transformer): a 16x16 grid
    assert out.attention.maps.shape == (3, 1, 2, 16, 16) and torch.isfinite(out.attention.maps).all()


def test_blocks_choose_the_layers_and_the_guidance_pass_stops_after_the_last(sana):
    calls = []
    last = sana.transformer.transformer_blocks[2]
    hook = last.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    try:
        out = _run(sana, [AttendExcite(subjects=["cat", "dog"], blocks=(0, 1), thresholds={})], steps=2)
    finally:
        hook.remove()
    assert out.guided_steps and calls == [False, False]  # the two (CFG-batched) denoising forwards only


def test_processors_restored_after_an_error(sana):
    before = processor_snapshot(sana.transformer)
    grads = [p.requires_grad for p in sana.transformer.parameters()]

    def boom(p, i, t, kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(sana, [AttendExcite(subjects=["cat", "dog"]), Regulate(subjects=["cat"])], callback_on_step_end=boom)
    assert processor_snapshot(sana.transformer) == before
    assert [p.requires_grad for p in sana.transformer.parameters()] == grads


# ---------------------------------------------------------------- the command line


def test_cli_tokens_shows_the_positions_the_transformer_attends_to(sana_dir, capsys):
    from attncontrol.cli import main

    assert main(["tokens", "a cat and a dog", "--model", str(sana_dir)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["2", "\u2581cat", "cat"] in rows and ["5", "\u2581dog", "dog"] in rows


@pytest.mark.slow
def test_cli_generate_with_a_method(sana_dir, tmp_path):
    from attncontrol.cli import main

    out = tmp_path / "sana.png"
    args = ["generate", "a cat and a dog", "--model", str(sana_dir), "--methods", "attend-excite", "--subjects"]
    args += ["cat", "dog", "--steps", "2", "--height", "256", "--width", "256", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0 and out.exists()


def test_cli_refuses_a_size_off_the_dc_ae_factor_before_loading(sana_dir, capsys):
    from attncontrol.cli import main

    args = ["generate", "a cat", "--model", str(sana_dir), "--subjects", "cat", "--height", "48", "--width", "256"]
    assert main(args) == 2 and "multiple of 32" in capsys.readouterr().err


def test_a_tail_window_keeps_the_head_and_the_padded_tail():
    """The generic rule: pad to len(reference ids) + extra, keep ``head`` then the last ``length - head``; ids
    past the padded length follow the window (cut off), and a window that would overlap its head is refused."""
    from attncontrol.testing import make_gemma_tokenizer

    tok = make_gemma_tokenizer()
    n_ref = len(tok("red blue").input_ids)  # <bos> red ▁blue: 3
    window = TailWindow(head=1, length=4, reference="red blue", extra=2)  # pad to 5, keep [0] + [2, 3, 4]
    assert window.select(tok, list(range(10))) == [0, 2, 3, 4, 5, 6, 7, 8, 9] and n_ref == 3
    with pytest.raises(OptionError, match="overlaps its head"):
        TailWindow(head=1, length=8, reference="red blue", extra=2).select(tok, list(range(10)))
