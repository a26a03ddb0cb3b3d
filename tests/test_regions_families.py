"""Regions (#27) on every tiny family beyond SD 1/2 and FLUX.1: the rule read from the probabilities each masked layer
uses, beta = 1 as the stock pipeline, each sub-prompt's segment as the pipeline's own ``encode_prompt`` of it, the
negative branch as the stock one, processors restored after an error inside a masked layer; Z-Image refused.

Every expectation is derived here, independently of the code under test: the stock pipeline's own outputs, the
pipeline's own ``encode_prompt`` called as its ``__call__`` calls it, and the rule's zeros and sums."""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch

from attncontrol import AttendExcite
from attncontrol.controls.regions import Regions
from attncontrol.errors import OptionError, UnsupportedPipelineError
from attncontrol.pipeline import prepare_run
from attncontrol.processors import regional
from attncontrol.testing import BUILDERS

PROMPT = "a car and a dog"
REGIONS = [("a red car", (0.0, 0.0, 0.5, 0.5)), ("a small dog", (0.5, 0.5, 1.0, 1.0))]  # two quadrants: background
CROSS = ("sdxl", "pixart", "sana")  # keys are text only: a row's probabilities sum to 1
FAMILIES = ("sdxl", "sd3", "sd35", "pixart", "sana", "flux2", "klein", "qwenimage")
KW = {
    "sdxl": {},
    "sd3": dict(max_sequence_length=32),
    "sd35": dict(max_sequence_length=32),
    "pixart": dict(max_sequence_length=24, height=128, width=128, use_resolution_binning=False),
    "sana": dict(max_sequence_length=24, height=256, width=256),
    "flux2": dict(max_sequence_length=96, height=128, width=128),
    "klein": dict(max_sequence_length=96, height=128, width=128),
    "qwenimage": dict(height=128, width=128, negative_prompt="blurry"),  # true CFG: a second forward
}
CFG = {"sdxl": "batched", "sd3": "batched", "sd35": "batched", "pixart": "batched", "sana": "batched"}
CFG |= {"klein": "sequential", "qwenimage": "sequential"}  # FLUX.2 [dev]: a guidance embedding, no CFG
# the fewest steps a family's scheduler takes (Qwen-Image's shift_terminal stretch divides by zero at one step)
FEW = {"qwenimage": 2}


@functools.cache
def _pipe(family: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = BUILDERS[family](0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(family: str, controls, steps: int = 2, output_type: str = "latent", **extra):
    kw = {**KW[family], **extra}
    return prepare_run(
        _pipe(family),
        PROMPT,
        controls,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        **kw,
    )


def _probed(family: str, beta: float):
    """A run with Regions at ``beta`` whose masked layers report their probabilities: (run, [(layer, P)])."""
    run = _run(family, [Regions(regions=REGIONS, base_prompt_weight=beta, stop=None)], steps=FEW.get(family, 1))
    calls: list = []
    run.regions.probe = lambda name, p: calls.append((name, p.detach().clone()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.execute()
    return run, calls


def _columns(segments) -> list[slice]:
    out, start = [], 0
    for n in segments:
        out.append(slice(start, start + n))
        start += n
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal within ``tol`` of the larger magnitude (float32 tiny models)."""
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


# -- the rule, from the probabilities every masked layer uses ------------------------------------------------------


def _check_rule(run, calls, beta: float, cross: bool) -> None:
    regions = run.regions
    cols = _columns(regions.segments)
    assert {name for name, _ in calls} == set(regions.layers)  # every masked layer was reached, at its shapes
    for name, p in calls:
        labels = regions.labels[regions.grid_of[name]]
        assert p.shape[-2:] == (labels.numel(), sum(regions.segments))
        background = labels == 0
        assert background.any() and (labels == 1).any() and (labels == 2).any()
        for r in range(1, len(cols)):
            own = labels == (1 << (r - 1))
            others = torch.cat([p[..., c] for i, c in enumerate(cols[1:], 1) if i != r], -1)
            assert torch.equal(others[..., own, :], torch.zeros_like(others[..., own, :])), (name, r)
            if beta == 0.0:
                assert not p[..., own, cols[0]].any(), (name, "base seen at beta 0")
            if cross:  # the regional branch is a softmax over the sub-prompt alone, the base branch over the base
                assert torch.allclose(
                    p[..., own, cols[r]].sum(-1), torch.full_like(p[..., own, 0], 1.0 - beta), atol=1e-5
                )
                assert torch.allclose(p[..., own, cols[0]].sum(-1), torch.full_like(p[..., own, 0], beta), atol=1e-5)
        sub = p[..., background, cols[0].stop :]
        assert torch.equal(sub, torch.zeros_like(sub)), (name, "background reads a sub-prompt")
        if beta == 1.0:
            assert not p[..., cols[0].stop :].any(), (name, "a sub-prompt seen at beta 1")
        if cross:
            assert torch.allclose(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_regional_probabilities_follow_the_rule(family):
    """Box tokens give 0 to other sub-prompts (at beta 0 also to the base), background tokens give 0 to every
    sub-prompt, cross-attention rows split 1 - beta / beta between the sub-prompt and the base; and the first masked
    layer of the first forward (the same inputs whatever beta) blends the two branches: P(b) = (1 - b) P(0) + b P(1)."""
    runs = {beta: _probed(family, beta) for beta in (0.0, 0.3, 1.0)}
    for beta, (run, calls) in runs.items():
        _check_rule(run, calls, beta, family in CROSS)
    first = {beta: calls[0] for beta, (_, calls) in runs.items()}
    assert first[0.0][0] == first[0.3][0] == first[1.0][0]
    blend = 0.7 * first[0.0][1] + 0.3 * first[1.0][1]
    assert _close(first[0.3][1], blend, 1e-6)
    assert not _close(first[0.0][1], first[1.0][1], 1e-3)  # the two branches differ: the blend says something


# -- beta = 1 is the stock pipeline --------------------------------------------------------------------------------


@functools.cache
def _stock(family: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run(family, []).execute().images


@pytest.mark.parametrize("family", FAMILIES)
def test_base_weight_one_is_the_stock_pipeline(family):
    """base_prompt_weight=1 (with classifier-free guidance where the family runs it) samples what the stock pipeline
        samples on the base prompt, bit for bit: no image or base query reads a regional key, and the grouped kernel
    gathers exactly the stock keys."""
    run = _run(family, [Regions(regions=REGIONS, base_prompt_weight=1.0, stop=None)])
    assert len(run.regions.segments) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = run.execute().images
    stock = _stock(family)
    assert images.shape == stock.shape
    assert torch.equal(images, stock), float((images - stock).abs().max())  # bit for bit on this CPU's torch
    moved = _run(family, [Regions(regions=REGIONS, base_prompt_weight=0.0, stop=None)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not _close(moved.execute().images, stock, 1e-3)  # the regions do change the image at beta 0


# -- the sub-prompts' segments are the pipeline's own encodings -----------------------------------------------------


def _default(pipe, name):
    return inspect.signature(pipe.__call__).parameters[name].default


def _own_encode(family: str, pipe, text: str, cfg: bool = False) -> dict:
    """The pipeline's ``encode_prompt`` of ``text`` as its ``__call__`` calls it: ``pe`` (and ``mask``, ``pooled``,
    ``neg``, ``neg_mask`` where the family has them)."""
    kw = KW[family]
    with torch.no_grad():
        if family == "sdxl":
            pe, npe, ppe, _ = pipe.encode_prompt(prompt=text, device="cpu", do_classifier_free_guidance=cfg)
            return dict(pe=pe, neg=npe, pooled=ppe)
        if family in ("sd3", "sd35"):
            pe, npe, ppe, _ = pipe.encode_prompt(
                prompt=text,
                prompt_2=None,
                prompt_3=None,
                device="cpu",
                do_classifier_free_guidance=cfg,
                max_sequence_length=kw["max_sequence_length"],
            )
            return dict(pe=pe, neg=npe, pooled=ppe)
        if family in ("pixart", "sana"):
            extra = (
                {"complex_human_instruction": _default(pipe, "complex_human_instruction")} if family == "sana" else {}
            )
            pe, mask, npe, nmask = pipe.encode_prompt(
                text,
                do_classifier_free_guidance=cfg,
                negative_prompt="",
                device="cpu",
                clean_caption=_default(pipe, "clean_caption"),
                max_sequence_length=kw["max_sequence_length"],
                **extra,
            )
            return dict(pe=pe, mask=mask, neg=npe, neg_mask=nmask)
        if family in ("flux2", "klein"):
            pe, ids = pipe.encode_prompt(prompt=text, device="cpu", max_sequence_length=kw["max_sequence_length"])
            return dict(pe=pe, ids=ids)
        pe, mask = pipe.encode_prompt(
            prompt=text, device="cpu", max_sequence_length=_default(pipe, "max_sequence_length")
        )
        return dict(pe=pe, mask=torch.ones(pe.shape[:2], dtype=torch.long) if mask is None else mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_segment_is_the_pipelines_own_encoding(family):
    """The joined text (the denoiser's ``cond`` and the pipeline's ``prompt_embeds``) is [base; r1; r2], each segment
    bit for bit the pipeline's ``encode_prompt`` of that text; masks likewise; pooled vectors the base's; a batched
    negative its own encoding zero-padded (mask 0), a sequential one untouched; FLUX.2's text ids continue."""
    pipe = _pipe(family)
    run = _run(family, [Regions(regions=REGIONS, stop=None)])
    batched = CFG.get(family) == "batched"
    base = _own_encode(family, pipe, PROMPT, cfg=batched)
    parts = [base] + [_own_encode(family, pipe, text) for text, _ in REGIONS]
    assert run.regions.segments == tuple(int(p["pe"].shape[1]) for p in parts)
    for key, value in (("pe", run.cond["encoder_hidden_states"]), ("pe", run.call_kwargs["prompt_embeds"])):
        assert torch.equal(value, torch.cat([p[key] for p in parts], 1))
    if "mask" in base:
        name = "prompt_embeds_mask" if family == "qwenimage" else "prompt_attention_mask"
        assert torch.equal(run.call_kwargs[name], torch.cat([p["mask"] for p in parts], 1))
        if family != "qwenimage":
            assert torch.equal(run.cond["encoder_attention_mask"], run.call_kwargs[name])
    if "pooled" in base:
        assert torch.equal(run.call_kwargs["pooled_prompt_embeds"], base["pooled"])
        assert torch.equal(run.cond["pooled_projections" if family != "sdxl" else "text_embeds"], base["pooled"])
    if batched:
        neg, n = run.call_kwargs["negative_prompt_embeds"], base["pe"].shape[1]
        assert neg.shape == run.call_kwargs["prompt_embeds"].shape
        assert torch.equal(neg[:, :n], base["neg"]) and not neg[:, n:].any()
        if "neg_mask" in base:
            nmask = run.call_kwargs["negative_prompt_attention_mask"]
            assert torch.equal(nmask[:, :n], base["neg_mask"]) and not nmask[:, n:].any()
    elif family == "klein":  # CFG's second forward: the empty prompt at its own length
        assert torch.equal(run.call_kwargs["negative_prompt_embeds"], _own_encode(family, pipe, "")["pe"])
    if family in ("flux2", "klein"):
        total = sum(run.regions.segments)
        ids = run.adapter.text_ids
        assert ids.shape == (1, total, 4) and torch.equal(ids[0, :, 3], torch.arange(total))
        assert not ids[..., :3].any() and torch.equal(ids[:, : parts[1]["pe"].shape[1]], parts[1]["ids"])


# -- the negative branch is the stock one -------------------------------------------------------------------------


def _first_step_outputs(
    family: str, controls, negative: str = "blurry", steps: int | None = None
) -> list[torch.Tensor]:
    """The denoiser's outputs of the first step (one call when CFG is batched, two when it is sequential), with a
    negative prompt (SDXL's empty negative is all zeros, which any attention maps to zero)."""
    run = _run(family, controls, steps=steps or FEW.get(family, 1), negative_prompt=negative)
    outs: list = []

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        outs.append(out.detach().clone())

    _execute_hooked(run, run.adapter.denoiser.register_forward_hook(hook))
    return outs[: 2 if CFG[family] == "sequential" else 1]


def _execute_hooked(run, handle) -> None:
    """Run ``run`` (the families' warnings silenced), then remove the hook ``handle``, however it ends."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.execute()
    finally:
        handle.remove()


@pytest.mark.parametrize("family", sorted(CFG))
def test_negative_branch_is_the_stock_negative(family):
    """At beta 0 (the strongest regions) the first step's negative prediction is the stock pipeline's, while the
    positive one differs: the negative rows read only their own tokens (batched: the zero padding masked)."""
    stock = _first_step_outputs(family, [])
    regions = _first_step_outputs(family, [Regions(regions=REGIONS, base_prompt_weight=0.0, stop=None)])
    if CFG[family] == "batched":
        assert len(stock) == len(regions) == 1
        half = stock[0].shape[0] // 2
        (neg_s, pos_s), (neg_r, pos_r) = (stock[0][:half], stock[0][half:]), (regions[0][:half], regions[0][half:])
    else:
        assert len(stock) == len(regions) == 2  # positive, then negative
        (pos_s, neg_s), (pos_r, neg_r) = stock, regions
    assert torch.equal(neg_r, neg_s), float((neg_r - neg_s).abs().max())
    assert not _close(pos_r, pos_s, 1e-3)


# -- restoration, refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_processors_restored_after_an_error_in_a_masked_layer(family, monkeypatch):
    """An error raised inside the regional attention (inside the layer's own processor, under the function mode)
    leaves the denoiser's processors the same objects as before and no torch function mode behind."""
    run = _run(family, [Regions(regions=REGIONS, stop=None)], steps=FEW.get(family, 1))
    denoiser = run.adapter.denoiser
    before = dict(denoiser.attn_processors)
    hits: list = []

    def boom(*args, **kwargs):
        hits.append(torch._C._len_torch_function_stack())
        raise RuntimeError("boom inside a masked layer")

    monkeypatch.setattr(regional, "regional_attention", boom)
    with pytest.raises(RuntimeError, match="boom inside a masked layer"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.execute()
    assert hits == [0]  # raised once, from inside the mode's handler (the mode is popped while it runs)
    after = denoiser.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert torch._C._len_torch_function_stack() == 0


def test_zimage_is_refused_before_model_work():
    """Z-Image's [image; image pads; caption; caption pads] sequence and its [positive; negative] CFG batch do not fit
    the regional layout: a typed error before the text encoder or the transformer runs."""
    pipe = _pipe("zimage")
    ran: list = []
    handles = [m.register_forward_pre_hook(lambda *a: ran.append(1)) for m in (pipe.text_encoder, pipe.transformer)]
    try:
        with pytest.raises(UnsupportedPipelineError, match="Z-Image is not supported"):
            prepare_run(pipe, PROMPT, [Regions(regions=REGIONS)], height=96, width=96, num_inference_steps=2)
        assert ran == []
        prepare_run(pipe, PROMPT, [], height=96, width=96, num_inference_steps=2)  # the same call without Regions
        assert ran  # ... encodes its prompt: the hooks would have seen it
    finally:
        for h in handles:
            h.remove()


def test_qwenimage_padded_base_keeps_its_mask():
    """Two prompts of different lengths: the shorter base is padded (mask 0), the sub-prompts follow; the joined
    mask reaches the pipeline and the guidance forward's ``encoder_hidden_states_mask``, and beta = 1 is still the
    stock pipeline bit for bit."""
    prompts = ["a car", "a car and a dog on the grass"]
    pipe = _pipe("qwenimage")
    own = [pipe.encode_prompt(prompt=p, device="cpu")[0].shape[1] for p in prompts]
    assert own[0] < own[1]
    kw = dict(KW["qwenimage"], num_inference_steps=2, output_type="latent")
    regions = Regions(regions=REGIONS, base_prompt_weight=1.0, stop=None)
    run = prepare_run(pipe, prompts, [regions], generator=torch.Generator().manual_seed(0), **kw)
    mask = run.call_kwargs["prompt_embeds_mask"]
    base = run.regions.segments[0]
    assert base == own[1] and mask[0, own[0] : base].sum() == 0 and mask[:, base:].all() and mask[1].all()
    assert torch.equal(run.cond["encoder_hidden_states_mask"], mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = run.execute().images
        stock = prepare_run(pipe, prompts, [], generator=torch.Generator().manual_seed(0), **kw).execute().images
    assert torch.equal(images, stock)


@pytest.mark.parametrize("family", ["flux2", "qwenimage"])
def test_guidance_forward_gets_the_joined_text(family):
    """With a guidance method beside Regions, every transformer call (the pipeline's and the guidance passes') gets
    text of the joined length with text ids (FLUX.2) or a mask (Qwen-Image, two prompts of different lengths) of
    the same length."""
    pipe, calls = _pipe(family), []

    def seen(module, args, kwargs):
        text = kwargs["encoder_hidden_states"]
        side = kwargs.get("txt_ids") if family == "flux2" else kwargs.get("encoder_hidden_states_mask")
        calls.append((text.shape[1], None if side is None else side.shape[-2 if family == "flux2" else -1]))

    prompts = ["a car", "a car and a dog on the grass"] if family == "qwenimage" else PROMPT
    controls = [Regions(regions=REGIONS, stop=None), AttendExcite(subjects=["car"], max_iter_to_alter=1)]
    kw = {k: v for k, v in KW[family].items() if k != "negative_prompt"}  # no second forward at another length
    run = prepare_run(pipe, prompts, controls, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw)
    total = sum(run.regions.segments)
    _execute_hooked(run, pipe.transformer.register_forward_pre_hook(seen, with_kwargs=True))
    assert len(calls) > 2  # the pipeline's two steps and at least one guidance pass
    assert all(call == (total, total) for call in calls), calls


def test_qwenimage_joined_text_beyond_max_sequence_length_is_refused():
    """QwenImagePipeline cuts the embeddings it is given to max_sequence_length: a longer joined text is refused,
    naming the length to pass; that length then runs."""
    with pytest.raises(OptionError, match=r"max_sequence_length=\d+") as err:
        _run("qwenimage", [Regions(regions=REGIONS)], max_sequence_length=40)
    needed = int(str(err.value).split("pass max_sequence_length=")[1].split()[0])
    run = _run("qwenimage", [Regions(regions=REGIONS)], max_sequence_length=needed)
    assert sum(run.regions.segments) == needed


def test_qwenimage_negative_as_long_as_the_joined_text_is_the_stock_negative():
    """Qwen-Image's negative is a second forward: one exactly as long as the joined text (so its length cannot tell
    it from the positive) still reads only its own tokens, being the layer's second call of the step: its first-step
    prediction is the stock one."""
    pipe = _pipe("qwenimage")
    total = sum(_run("qwenimage", [Regions(regions=REGIONS)]).regions.segments)
    negative = "blurry"
    while pipe.encode_prompt(prompt=negative, device="cpu")[0].shape[1] < total:
        negative += " a"
    assert pipe.encode_prompt(prompt=negative, device="cpu")[0].shape[1] == total

    regions = [Regions(regions=REGIONS, base_prompt_weight=0.0)]
    # 2 steps: with 1, this long negative drives the tiny model to NaN in the stock pipeline too
    (pos_s, neg_s), (pos_r, neg_r) = (_first_step_outputs("qwenimage", c, negative, steps=2) for c in ([], regions))
    assert torch.equal(neg_r, neg_s), float((neg_r - neg_s).abs().max())
    assert not torch.allclose(pos_r, pos_s, atol=1e-3)
