"""Regional prompting (#27): which token is in which box, the rule per layout against hand-written tables, the
kernels against explicit float64 masked softmaxes (values and gradients), and on tiny SD 1.x and FLUX.1
pipelines: the captured probabilities obey the masks, beta = 1 is the stock pipeline bit for bit, composition with
every guidance method, refusals, and restoration after errors. The other families: tests/test_regions_families.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import attncontrol
from attncontrol.controls.regions import Regions, box_tokens, region_labels
from attncontrol.errors import OptionError, UnsupportedPipelineError
from attncontrol.processors.regional import (
    RegionalSDPA,
    RegionLayout,
    regional_attention,
    regional_probs,
    regional_text_probs,
)

TWO = [("a red car", (0.0, 0.0, 0.5, 1.0)), ("a dog", (0.5, 0.0, 1.0, 1.0))]

# -- which token is in which box ---------------------------------------------------------------------------------


def test_box_tokens_take_the_cells_whose_centre_is_inside():
    # 4x4 cells, centres at 0.125, 0.375, 0.625, 0.875: x in [0.3, 0.7) holds columns 1 and 2, y in [0, 0.4) rows 0-1
    got = box_tokens((0.3, 0.0, 0.7, 0.4), 4, 4)
    expected = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, expected)


def test_a_box_between_centres_still_gets_the_cell_of_its_centre():
    got = box_tokens((0.26, 0.51, 0.36, 0.6), 4, 4)  # holds no centre; its centre (0.31, 0.555) is in row 2, col 1
    assert got.sum() == 1 and got[2, 1]


def test_labels_are_bits_per_region_and_overlaps_have_both():
    labels = region_labels([[(0.0, 0.0, 0.5, 1.0)], [(0.25, 0.0, 1.0, 0.5)]], (4, 4)).view(4, 4)
    expected = torch.tensor([[1, 3, 2, 2], [1, 3, 2, 2], [1, 1, 0, 0], [1, 1, 0, 0]])
    assert torch.equal(labels, expected)


def test_coarse_levels_or_pool_the_finest_labels_so_small_boxes_survive():
    # at 8x8 the box holds the four middle cells (rows and columns 3-4), one in each 2x2 quadrant; at 2x2 it holds
    # no centre, so alone the floor would give it one cell
    small = [[(0.375, 0.375, 0.625, 0.625)]]
    assert region_labels(small, (2, 2)).view(2, 2).tolist() == [[0, 0], [0, 1]]
    assert region_labels(small, (2, 2), finest=(8, 8)).view(2, 2).tolist() == [[1, 1], [1, 1]]
    # a box that covers whole coarse cells: pooling and the direct rule agree
    big = [[(0.0, 0.0, 0.5, 1.0)]]
    assert torch.equal(region_labels(big, (2, 2), finest=(8, 8)), region_labels(big, (2, 2)))


# -- the rule, written out by hand ----------------------------------------------------------------------------------


def _allowed(layout: RegionLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The docstring table of processors/regional.py, entry by entry, independently of its index tables."""
    segments, labels = layout.segments, layout.labels.tolist()
    n_text, n_img = sum(segments), len(labels)
    seg_of = [s for s, length in enumerate(segments) for _ in range(length)]
    if layout.text_first is None:
        queries = [("img", lab) for lab in labels]
        keys = [("txt", s) for s in seg_of]
    else:
        text = [("txt", s) for s in seg_of]
        image = [("img", lab) for lab in labels]
        queries = keys = text + image if layout.text_first else image + text
    regional = torch.zeros(len(queries), len(keys), dtype=torch.bool)
    base = torch.zeros(len(queries), len(keys), dtype=torch.bool)
    for i, (qk, ql) in enumerate(queries):
        for j, (kk, kl) in enumerate(keys):
            base[i, j] = kk == "img" or kl == 0
            if qk == "img" and kk == "txt":
                ok = kl == 0 if ql == 0 else kl >= 1 and bool(ql >> (kl - 1) & 1)
            elif qk == "img":
                ok = layout.image_self == "all" or (ql & kl != 0 if ql else kl == 0)
            elif ql == 0:  # base text
                ok = kk == "img" or kl == 0
            else:  # sub-prompt ql
                ok = kl == ql if kk == "txt" else bool(kl >> (ql - 1) & 1)
            regional[i, j] = ok
    assert n_img + n_text >= len(queries)
    return regional, base


LABELS = region_labels([[(0.0, 0.0, 0.5, 1.0)], [(0.25, 0.0, 1.0, 0.5)]], (4, 4))


@pytest.mark.parametrize("text_first", [True, False, None])
@pytest.mark.parametrize("image_self", ["region", "all"])
def test_the_index_tables_are_the_rule(text_first, image_self):
    layout = RegionLayout((5, 3, 4), LABELS, text_first, image_self)
    regional, base = layout.tables.masks(layout.n_queries)
    want_regional, want_base = _allowed(layout)
    assert torch.equal(regional, want_regional)
    assert torch.equal(base, want_base)


def test_hand_written_cross_rule_for_two_tokens():
    # two image tokens: one in region 1, one background; text: base 2 tokens, region 1 one token, region 2 one token
    layout = RegionLayout((2, 1, 1), torch.tensor([1, 0]), None)
    regional, base = layout.tables.masks(2)
    assert regional.tolist() == [[False, False, True, False], [True, True, False, False]]
    assert base.tolist() == [[True, True, False, False], [True, True, False, False]]


# -- the kernels against explicit softmaxes ------------------------------------------------------------------------


def _oracle(q, k, v, layout, beta, n_plain, bias=None):
    regional, base = _allowed(layout)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    p_base = torch.softmax(scores.masked_fill(~base, -math.inf), -1)
    p_reg = torch.softmax(scores.masked_fill(~regional, -math.inf), -1)
    out = p_reg @ v
    image = torch.tensor([i for i in range(q.shape[2]) if regional[i].any() and not _is_text(layout, i)])
    out[:, :, image] = (1 - beta) * out[:, :, image] + beta * (p_base @ v)[:, :, image]
    out[:n_plain] = (p_base @ v)[:n_plain]
    return out


def _is_text(layout: RegionLayout, i: int) -> bool:
    if layout.text_first is None:
        return False
    return i < layout.text_len if layout.text_first else i >= layout.n_image


def _qkv(layout, batch=3, heads=2, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_k = (batch, heads, layout.n_queries, dim), (batch, heads, layout.n_keys, dim)
    return (torch.randn(s, generator=g, dtype=dtype) for s in (shape_q, shape_k, shape_k))


@pytest.mark.parametrize("text_first", [True, False, None])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kernel", ["grouped", "dense"])
def test_kernels_equal_the_explicit_masked_softmax(text_first, beta, kernel):
    layout = RegionLayout((5, 3, 4), LABELS, text_first)
    q, k, v = _qkv(layout)
    got = regional_attention(q, k, v, layout, beta, n_plain=1, kernel=kernel)
    want = _oracle(q, k, v, layout, beta, 1)
    rows = torch.tensor([i for i in range(layout.n_queries) if not _is_text(layout, i)])
    if beta < 1:
        rows = torch.arange(layout.n_queries)  # every row is defined
    assert torch.allclose(got[:, :, rows], want[:, :, rows], atol=1e-12, rtol=0)
    assert torch.allclose(got[:1], want[:1], atol=1e-12, rtol=0)  # the plain row: base text and image keys


@pytest.mark.parametrize("kernel", ["grouped", "dense"])
def test_kernels_honour_the_layers_own_key_mask_and_have_the_exact_gradient(kernel):
    layout = RegionLayout((5, 3, 4), LABELS, True)
    q, k, v = (t.requires_grad_() for t in _qkv(layout))
    bias = torch.zeros(3, 1, 1, layout.n_keys, dtype=torch.float64)
    bias[:, :, :, 3:5] = -math.inf  # the base's last two tokens are padding, as a key-padding mask says
    bias[:, :, :, 7] = -math.inf  # and region 1's last one
    got = regional_attention(q, k, v, layout, 0.3, n_plain=1, attn_mask=bias, kernel=kernel)
    want = _oracle(q, k, v, layout, 0.3, 1, bias)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    weights = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((got * weights).sum(), [q, k, v])
    want_grads = torch.autograd.grad((want * weights).sum(), [q, k, v])
    for a, b in zip(grads, want_grads):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_joint_maps_are_the_probabilities_the_attention_uses(text_first, beta):
    layout = RegionLayout((5, 3, 4), LABELS, text_first)
    q, k, _ = _qkv(layout, batch=2)
    regional, base = _allowed(layout)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    used = (1 - beta) * torch.softmax(scores.masked_fill(~regional, -math.inf), -1) + beta * torch.softmax(
        scores.masked_fill(~base, -math.inf), -1
    )
    start = 0 if text_first else layout.n_image
    image = slice(layout.text_len, None) if text_first else slice(0, layout.n_image)
    want = used[:, :, image, start : start + layout.text_len]
    probs, mass = regional_text_probs(q, k, layout, beta, 1 / math.sqrt(q.shape[-1]), None)
    assert torch.allclose(probs, want, atol=1e-12, rtol=0)
    assert torch.allclose(mass, want.sum(-1), atol=1e-12, rtol=0)
    cols = torch.tensor([0, 6, 11])
    assert torch.allclose(regional_text_probs(q, k, layout, beta, 1 / math.sqrt(8), cols)[0], want[..., cols])


def test_cross_probabilities_from_scores_are_the_blend():
    layout = RegionLayout((5, 3, 4), LABELS, None)
    q, k, v = _qkv(layout, batch=2)
    heads = q.shape[1]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = regional_probs(scores.flatten(0, 1), heads, layout, 0.3, n_plain=1).view_as(scores)
    assert torch.allclose(probs @ v, _oracle(q, k, v, layout, 0.3, 1), atol=1e-12, rtol=0)


def test_the_mode_leaves_other_attention_calls_alone():
    layout = RegionLayout((5, 3, 4), LABELS, True)
    q, k, v = _qkv(layout)
    mode = RegionalSDPA(layout, 0.3, lambda b: 0)
    other = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    with mode:
        same = torch.nn.functional.scaled_dot_product_attention(other, other, other)
        masked = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(same, torch.nn.functional.scaled_dot_product_attention(other, other, other))
    assert torch.allclose(masked, regional_attention(q, k, v, layout, 0.3), atol=0, rtol=0)
    assert (mode.calls, mode.other_calls) == (1, 1)


# -- the options ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "regions,message",
    [
        ([], "needs at least one"),
        ([("", (0, 0, 1, 1))], "sub-prompt is empty"),
        ([("a car", (0.5, 0, 0.2, 1))], "x0 < x1"),
        ([("a car", (0, 0, 1.5, 1))], "inside \\[0, 1\\]"),
        ([("a car", (0, 0, 1, 1))] * 9, "at most 8 regions"),
        ("a car", "no .@. found"),
    ],
)
def test_bad_regions_are_refused_naming_the_value(regions, message):
    with pytest.raises(OptionError, match=message):
        Regions(regions=regions)


def test_published_names_and_defaults():
    r = Regions(regions=TWO, base_ratio=0.2, until=5)
    assert (r.base_prompt_weight, r.stop, r.start) == (0.2, 5, 0)
    d = Regions(regions=TWO)
    assert d.base_prompt_weight == 0.3 and d.stop == 10 / 24 and d.image_self == "region"
    assert d.extra_text() == ("a red car", "a dog")


# -- on tiny pipelines ---------------------------------------------------------------------------------------------

SIZES = {"sd1": dict(height=64, width=64), "flux": dict(height=64, width=64, max_sequence_length=32)}


@pytest.fixture(scope="module", params=["sd1", "flux"])
def tiny(request):
    from attncontrol.testing import BUILDERS

    return request.param, BUILDERS[request.param](0)


def _run(pipe, family, controls, steps=3, prompt="a car and a dog", **kw):
    from attncontrol.pipeline import prepare_run

    args = dict(num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0))
    return prepare_run(pipe, prompt, controls, **SIZES[family], **args, **kw)


def test_box_tokens_read_only_their_sub_prompt(tiny):
    family, pipe = tiny
    run = _run(pipe, family, [Regions(regions=TWO, base_prompt_weight=0.0, stop=None)])
    seen: dict[str, torch.Tensor] = {}
    run.regions.probe = lambda name, p: seen.setdefault(name, p)
    run.execute()
    assert set(seen) == set(run.regions.layers)
    base, first, second = run.regions.segments
    for name, probs in seen.items():
        labels = run.regions.labels[run.regions.grid_of[name]]
        summed = probs.float().sum(1)  # images, image tokens, text columns
        left, right = summed[:, labels == 1], summed[:, labels == 2]
        assert left.numel() and right.numel()
        assert left[..., :base].abs().max() == 0 and left[..., base + first :].abs().max() == 0
        assert right[..., : base + first].abs().max() == 0
        assert left[..., base : base + first].sum(-1).min() > 0


def test_beta_one_is_the_stock_pipeline_bit_for_bit(tiny):
    family, pipe = tiny
    stock = _run(pipe, family, []).execute().images
    same = _run(pipe, family, [Regions(regions=TWO, base_prompt_weight=1.0, stop=None)]).execute().images
    changed = _run(pipe, family, [Regions(regions=TWO, stop=None)]).execute().images
    assert torch.equal(same, stock)
    assert (changed - stock).abs().max() > 1e-3  # and the regions do change the image


def test_after_the_window_the_steps_are_the_plain_models(tiny):
    """Two runs that differ only in beta inside a window of one step leave that step with different latents, and
    the rest differs only through them: with the window empty of effect (beta 1) every step is stock."""
    family, pipe = tiny
    one = _run(pipe, family, [Regions(regions=TWO, stop=1)])
    seen: list[float] = []
    original = one.regions.begin_step
    one.regions.begin_step = lambda step: (original(step), seen.append(one.regions.weight))[0]
    out = one.execute()
    assert seen == [0.3, 1.0, 1.0]
    assert [step.edits["regions"]["base_prompt_weight"] for step in out.trace] == seen  # the trace says so


def test_every_guidance_method_runs_on_the_masked_network(tiny):
    from tests.test_request import GUIDED

    family, pipe = tiny
    for method, kwargs in GUIDED.items():
        cls = attncontrol.controls.METHODS[method]
        extra = dict(rounds=1, round_steps=1, final_steps=0, max_refinement_steps=1) if method == "initno" else {}
        control = cls(**kwargs, **extra)
        run = _run(pipe, family, [Regions(regions=TWO, stop=None), control], steps=1, prompt="a red cat and a dog")
        passes: list[bool] = []  # per masked layer call: was it a guidance pass?
        run.regions.probe = lambda name, p, run=run, passes=passes: passes.append(bool(run.store.active))
        out = run.execute()
        assert torch.isfinite(out.images).all(), method
        losses = [x for s in out.trace if s.loss is not None for x in s.loss]
        assert losses and all(math.isfinite(x) for x in losses), method
        assert any(passes) and not all(passes), method  # guidance passes and the sampling both ran masked


def test_regions_with_attention_regulation_are_refused(tiny):
    family, pipe = tiny
    with pytest.raises(OptionError, match="regions cannot run with regulate"):
        _run(pipe, family, [Regions(regions=TWO), attncontrol.Regulate(subjects=["car"])])


def test_processors_are_restored_after_an_error_inside_a_masked_layer(tiny, monkeypatch):
    import attncontrol.processors.regional as regional

    family, pipe = tiny
    denoiser = pipe.unet if family == "sd1" else pipe.transformer
    before = dict(denoiser.attn_processors)

    def broken(*args, **kwargs):
        raise RuntimeError("inside the layer")

    monkeypatch.setattr(regional, "regional_attention", broken)
    with pytest.raises(RuntimeError, match="inside the layer"):
        _run(pipe, family, [Regions(regions=TWO)]).execute()
    after = denoiser.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_a_processor_that_does_not_use_sdpa_is_refused_not_run_unmasked():
    from diffusers.models.attention_processor import AttnProcessor

    from attncontrol.testing import BUILDERS

    pipe = BUILDERS["sd1"](0)
    pipe.unet.set_attn_processor(AttnProcessor())  # bmm and softmax, no scaled_dot_product_attention
    with pytest.raises(UnsupportedPipelineError, match="scaled_dot_product_attention"):
        _run(pipe, "sd1", [Regions(regions=TWO)]).execute()
    assert all(isinstance(p, AttnProcessor) for p in pipe.unet.attn_processors.values())


def test_checkpointed_guidance_passes_see_the_same_masks(tiny):
    """Gradient checkpointing recomputes the masked layers in the backward: the same images as without it."""
    family, pipe = tiny
    controls = lambda: [Regions(regions=TWO, stop=None), attncontrol.AttendExcite(subjects=["car", "dog"])]  # noqa: E731
    plain = _run(pipe, family, controls(), steps=2).execute()
    checkpointed = _run(pipe, family, controls(), steps=2, checkpointing=True).execute()
    assert torch.allclose(plain.images, checkpointed.images, atol=1e-6, rtol=0)
    assert plain.trace[0].loss == pytest.approx(checkpointed.trace[0].loss, rel=1e-5)


def test_observed_maps_read_the_subject_in_the_prompt_and_in_its_sub_prompt(tiny):
    """``attention=`` beside Regions records a subject's maps from the probabilities the masked layers use, over
    its tokens in the prompt and in every sub-prompt that names it: with beta 0, "car"'s raw map is positive in the
    car's box (its sub-prompt), 0 in the dog's (whose sub-prompt has no car) and positive in the background (the
    prompt's own "car")."""
    family, pipe = tiny
    half = [("a red car", (0.0, 0.0, 0.5, 0.5)), ("a dog", (0.5, 0.0, 1.0, 0.5))]  # the bottom half: background
    out = _run(pipe, family, [Regions(regions=half, base_prompt_weight=0.0, stop=None)], attention=["car"]).execute()
    raw = out.attention.raw[0][0, 0]  # step 0, image 0, "car": (rows, cols)
    rows, cols = raw.shape
    assert raw[: rows // 2, : cols // 2].min() > 0
    assert raw[: rows // 2, cols // 2 :].abs().max() == 0
    assert raw[rows // 2 :].min() > 0


def test_a_subject_is_found_in_the_prompt_and_in_the_sub_prompts_that_name_it(tiny):
    family, pipe = tiny
    run = _run(pipe, family, [Regions(regions=TWO)], prompt="a red car and a dog")
    base, first, _ = run.regions.segments
    assert run.ctx.seq_len == sum(run.regions.segments) and run.ctx.text.base_length == base
    (car, dog, red), *_ = run.ctx.subjects_per_image(["car", "dog", "red"])
    base_car = [p for p in car if p < base]
    assert base_car and [p for p in car if p >= base] and all(base <= p < base + first for p in car if p >= base)
    assert all(p < base or p >= base + first for p in dog)  # the dog's sub-prompt is the second
    # "a red car" as the pipeline's tokenizer writes it: CLIP puts a start token first ("car" at 3), T5 none (at 2)
    assert [p - base for p in car if p >= base] == [3 if family == "sd1" else 2]
    with pytest.raises(attncontrol.errors.SubjectError):
        run.ctx.subjects_per_image(["bus"])  # named nowhere: still an error
    # the token softmax keeps the prompt's tokens as the family does, and only the sub-prompts' own words
    keep = run.ctx.keep_mask(False)[0]
    plain = _run(pipe, family, [], prompt="a red car and a dog").ctx.keep_mask(False)[0]
    assert torch.equal(keep[:base], plain)
    words = 3 + 2  # "a red car", "a dog": no start, end or padding token
    assert int(keep[base:].sum()) == words


def test_a_joined_text_call_the_rule_does_not_match_is_refused_not_run_unmasked(monkeypatch):
    """A layer called with the base and sub-prompts whose attention call has shapes the layout does not know (a
    family layout the rule was not written for) raises instead of sampling unmasked."""
    from attncontrol.testing import BUILDERS

    pipe = BUILDERS["sd1"](0)
    monkeypatch.setattr(RegionLayout, "matches", lambda self, n_queries, n_keys: False)
    with pytest.raises(UnsupportedPipelineError, match="regional shapes"):
        _run(pipe, "sd1", [Regions(regions=TWO)]).execute()


def test_the_guidance_pass_reads_the_masked_probabilities_the_sampling_uses(tiny):
    """At step 0, before any update moves the latents (a step size too small to change them), the guidance pass's
    probabilities in each masked layer it reaches equal the sampling forward's conditional ones: the guidance
    forward gets the joined text, the same masks and the same base weight."""
    family, pipe = tiny
    ae = attncontrol.AttendExcite(subjects=["car", "dog"], scale_factor=1e-30, max_refinement_steps=0)
    run = _run(pipe, family, [Regions(regions=TWO, stop=None), ae], steps=1)
    seen: dict[bool, dict[str, torch.Tensor]] = {True: {}, False: {}}
    run.regions.probe = lambda name, p: seen[bool(run.store.active)].setdefault(name, p.float().clone())
    run.execute()
    guided, sampled = seen[True], seen[False]
    assert guided and set(guided) <= set(sampled)
    for name, probs in guided.items():
        assert torch.allclose(probs, sampled[name], atol=1e-5, rtol=1e-4), name


def test_a_background_prompt_is_read_by_the_pixels_outside_every_box(tiny):
    """``background=``: a last sub-prompt that only the pixels outside every box read (at beta 0 they give the
    base prompt nothing); the boxes' tokens still read only their own sub-prompt."""
    family, pipe = tiny
    half = [("a red car", (0.0, 0.0, 0.5, 0.5)), ("a dog", (0.5, 0.0, 1.0, 0.5))]  # the bottom half: background
    run = _run(pipe, family, [Regions(regions=half, background="a photo", base_prompt_weight=0.0, stop=None)])
    assert run.regions.texts == ("a red car", "a dog", "a photo") and len(run.regions.segments) == 4
    seen: dict[str, torch.Tensor] = {}
    run.regions.probe = lambda name, p: seen.setdefault(name, p)
    run.execute()
    base, first, second, _ = run.regions.segments
    for name, probs in seen.items():
        labels = run.regions.labels[run.regions.grid_of[name]]
        summed = probs.float().sum(1)
        outside, car = summed[:, labels == 4], summed[:, labels == 1]
        assert outside.numel() and car.numel()
        assert outside[..., : base + first + second].abs().max() == 0
        assert outside[..., base + first + second :].sum(-1).min() > 0
        assert car[..., :base].abs().max() == 0 and car[..., base + first :].abs().max() == 0
