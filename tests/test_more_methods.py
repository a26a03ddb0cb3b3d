"""Divide & Bind, CONFORM, SynGen, BoxDiff, InitNO: each loss on hand-made maps whose answer was worked out by
hand from the official code's definitions (the derivations are in the comments), the controls' word grouping and
validation, one guidance step on the tiny models, InitNO's noise search."""

import math

import pytest
import torch

import attncontrol
from attncontrol import BoxDiff, Conform, DivideBind, InitNO, OptionError, SubjectError, SynGen
from attncontrol.controls import ControlContext, StepInfo
from attncontrol.controls.vocabulary import MapKey
from attncontrol.losses import (
    binding_divergence,
    boxdiff_loss,
    boxdiff_terms,
    clean_term,
    cross_response,
    divide_bind_loss,
    gaussian_kl,
    grid_box,
    jensen_shannon,
    nt_xent,
    otsu_level,
    self_conflict,
    symmetric_kl,
    syngen_group_loss,
    total_variation,
)
from attncontrol.ops import gaussian_smooth, token_softmax

from .conftest import processor_snapshot, seeded

T = torch.tensor

# ---------------------------------------------------------------- Divide & Bind


def test_total_variation_as_coded_and_neighbour():
    # DB-1: horizontal (|0-1| + |2-4|) / 2 = 1.5; the coded vertical term compares the last row with rows 1.. = 0
    x = T([[0.0, 1.0], [2.0, 4.0]])
    assert total_variation(x).item() == pytest.approx(1.5)
    assert total_variation(x, "neighbour").item() == pytest.approx(1.5 + (2 + 3) / 2)
    # DB-2: horizontal 8 / 6; coded vertical: last row [0,1,0] vs [1,3,1] (4) and vs itself (0), over 6 -> 2/3
    y = T([[0.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 0.0]])
    assert total_variation(y).item() == pytest.approx(2.0)
    assert total_variation(y, "neighbour").item() == pytest.approx(8 / 6 + 8 / 6)
    # two subjects, no attributes: L = max(-TV(y), -TV(2y)) = -2; the refinement reads the smallest TV
    loss, min_tv = divide_bind_loss(torch.stack([y, 2 * y]), [[], []], 0)
    assert loss.item() == pytest.approx(-2.0) and min_tv == pytest.approx(2.0)


def test_binding_divergence_and_its_weight_by_step():
    # DB-3: S = [[0,0],[0,ln 3]], A = [[2,0],[0,0]]: P = (1,1,1,3)/6, Q = (3,1,1,1)/6 after rescaling A to S's
    # peak; cut 0.2 * 1/2; P~ = (a,a,a,b), Q~ = (b,a,a,a), a = 1/15 + 1e-5, b = 2/5 + 1e-5;
    # JSD = a ln(2a/(a+b)) + b ln(2b/(a+b))
    s, a_map = T([[0.0, 0.0], [0.0, math.log(3)]]), T([[2.0, 0.0], [0.0, 0.0]])
    a, b = 1 / 15 + 1e-5, 2 / 5 + 1e-5
    jsd = a * math.log(2 * a / (a + b)) + b * math.log(2 * b / (a + b))
    tv = total_variation(s)
    assert tv.item() == pytest.approx(math.log(3) / 2)
    assert binding_divergence(s, a_map, tv).item() == pytest.approx(jsd, abs=1e-6)
    assert jsd == pytest.approx(0.1320739, abs=1e-7)
    for step, weight in ((5, 1), (15, 5), (25, 10)):
        loss, _ = divide_bind_loss(s[None], [[a_map]], step)
        assert loss.item() == pytest.approx(weight * jsd - math.log(3) / 2, abs=1e-5)


def test_jensen_shannon_is_zero_for_equal_and_ln2_for_disjoint():
    p = T([0.5, 0.5, 0.0, 0.0]) + 1e-12
    q = T([0.0, 0.0, 0.5, 0.5]) + 1e-12
    assert jensen_shannon(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert jensen_shannon(p, q).item() == pytest.approx(math.log(2), abs=1e-6)


# ---------------------------------------------------------------- CONFORM


def _flat(*maps):
    return torch.stack([T(m, dtype=torch.float32).flatten() for m in maps])


def test_nt_xent_on_hand_made_maps():
    # CF-1: cos(a1,n1) = cos(a2,n2) = 1/sqrt2, cos(n1,n2) = 1/2, other cross pairs 0; tau 0.5
    e = _flat([[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [1, 0]], [[0, 1], [1, 0]])
    r2 = math.sqrt(2)
    a = math.log(1 + 2 * math.exp(-r2))  # anchors a1, a2: both negatives at cosine 0
    n = math.log(1 + (1 + math.e) * math.exp(-r2))  # anchors n1, n2: one negative at cosine 1/2
    assert nt_xent(e, [0, 0, 1, 1]).item() == pytest.approx((a + n) / 2, abs=1e-6)
    assert (a + n) / 2 == pytest.approx(0.520095, abs=1e-6)
    # CF-2: groups [[a, n], [x]]: x has no positive but is a negative of both anchors
    e2 = _flat([[1, 0], [0, 0]], [[1, 1], [0, 0]], [[1, 1], [1, 1]])
    expected = (math.log(1 + math.exp(1 - r2)) + math.log(2)) / 2
    assert nt_xent(e2, [0, 0, 1]).item() == pytest.approx(expected, abs=1e-6)
    # CF-3: no two embeddings share a label -> 0, no update
    assert nt_xent(e2[:2], [0, 1]).item() == 0.0
    # the temperature divides every similarity
    assert nt_xent(e, [0, 0, 1, 1], 0.07).item() == pytest.approx(0.025354, abs=1e-5)


# ---------------------------------------------------------------- SynGen

U, N, A = T([[1.0, 1.0], [1.0, 1.0]]), T([[1.0, 1.0], [1.0, 3.0]]), T([[3.0, 1.0], [1.0, 1.0]])


def test_symmetric_kl_of_spatial_distributions():
    # SG-1: KL(U||N) = 3/4 ln(3/2) + 1/4 ln(1/2); KL(N||U) = 1/2 ln(4/3)
    d_un = ((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) + 0.5 * math.log(4 / 3)) / 2
    assert symmetric_kl(U, N).item() == pytest.approx(d_un, abs=1e-6)
    assert symmetric_kl(100 * U, 100 * N).item() == pytest.approx(d_un, abs=1e-6)  # scale-free
    assert symmetric_kl(N, A).item() == pytest.approx(math.log(3) / 3, abs=1e-6)


def test_syngen_group_loss_one_and_two_modifiers():
    d_un, d_na = symmetric_kl(U, N).item(), math.log(3) / 3
    # SG-2 "a red cat": red = U, cat = N, "a" = A
    loss = syngen_group_loss([[U]], [N], [A])
    assert loss.item() == pytest.approx(d_un - (d_un + d_na) / 2, abs=1e-6)
    # SG-3 "a big red cat": big = U, red = N, cat = N; the noun's push counted once per modifier
    loss = syngen_group_loss([[U], [N]], [N], [A])
    assert loss.item() == pytest.approx(d_un + 0 - (d_un + d_na) / 2 - d_na, abs=1e-6)
    # a noun alone: only its push away from the others; a multi-piece word takes its worst piece
    assert syngen_group_loss([], [N], [A, U]).item() == pytest.approx(-(d_na + d_un) / 2, abs=1e-6)
    assert syngen_group_loss([[U, A]], [N], []).item() == pytest.approx(max(d_un, d_na), abs=1e-6)


# ---------------------------------------------------------------- BoxDiff

X4 = T([[0.1, 0.2, 0.0, 0.3], [0.0, 0.9, 0.5, 0.1], [0.2, 0.7, 0.4, 0.0], [0.0, 0.1, 0.6, 0.2]])
BOX4 = (0.25, 0.25, 0.75, 0.75)  # grid (1, 1, 3, 3) on 4x4


def test_boxdiff_terms_on_a_hand_made_map():
    # BD-1, P = 0.5: inside {.9,.5,.7,.4}, top 2 -> 0.8; outside 12 cells, top 6 sum 1.6;
    # corners (all 4 cells selected with L = 1): |px - gx| = .2,.1,.4,.3 and |py - gy| = .3,.1,.3,.6, over 4
    terms = boxdiff_terms(X4, BOX4, top=0.5, window=1)
    got = {k: round(v.item(), 6) for k, v in terms.items()}
    assert got == {"inner": 0.2, "outer": round(1.6 / 6, 6), "corner_x": 0.25, "corner_y": 0.325}
    # L = 0: only cells x1 = 1 and x2 = 3 (the end, target 0): (0.1 + 0.3) / 4 and (0.1 + 0.6) / 4
    terms0 = boxdiff_terms(X4, BOX4, top=0.5, window=0)
    assert terms0["corner_x"].item() == pytest.approx(0.1) and terms0["corner_y"].item() == pytest.approx(0.175)
    total, worst = boxdiff_loss(torch.stack([X4, X4]), [BOX4, BOX4], top=0.5, window=1)
    assert total.item() == pytest.approx(2 * (0.2 + 1.6 / 6 + 0.25 + 0.325), abs=1e-6) and worst == pytest.approx(0.2)


def test_boxdiff_on_the_smoothed_map_and_grid_rounding():
    # BD-2: the reference kernel with reflect padding: a delta at [1,1] of a 4x4 map gives b^2 at the centre,
    # 4a^2 at [0,0] (the pad reflects the delta into all four corners) and 2ab at [0,1]
    a, b = math.exp(-1) / (1 + 2 * math.exp(-1)), 1 / (1 + 2 * math.exp(-1))
    delta = torch.zeros(4, 4)
    delta[1, 1] = 1
    s = gaussian_smooth(delta)
    assert [s[1, 1].item(), s[0, 0].item(), s[0, 1].item()] == pytest.approx([b * b, 4 * a * a, 2 * a * b], abs=1e-6)
    terms = boxdiff_terms(gaussian_smooth(X4), BOX4, top=0.5, window=1)
    assert [round(v.item(), 5) for v in terms.values()] == pytest.approx(
        [1 - 0.489111, 0.336693, 0.427499, 0.440356], abs=2e-5
    )
    # BD-3: 512-pixel box [48, 80, 240, 496] / 32 = 1.5, 2.5, 7.5, 15.5 -> round half to even -> (2, 2, 8, 16)
    assert grid_box((48 / 512, 80 / 512, 240 / 512, 496 / 512), 16, 16) == (2, 2, 8, 16)
    # a box smaller than a cell still has one cell (the official top-k would be empty)
    assert grid_box((0.50, 0.50, 0.51, 0.51), 16, 16) == (8, 8, 9, 9)
    # the top-k count is floor(P * area): 84 cells -> 16 largest; the 17th largest is excluded
    x = torch.zeros(16, 16)
    x[2:16, 2:8] = torch.arange(84, dtype=torch.float32).reshape(14, 6) / 84
    inner = boxdiff_terms(x, (2 / 16, 2 / 16, 8 / 16, 1.0))["inner"].item()
    assert inner == pytest.approx(1 - sum(range(68, 84)) / 16 / 84, abs=1e-6)
    # the x100 token softmax of the shared recipe: raw (0.30, 0.29, 0.01) -> (e, 1, e^-28) / sum
    p = token_softmax(T([0.30, 0.29, 0.01]).view(1, 1, 1, 3), torch.ones(1, 3, dtype=torch.bool)).flatten()
    assert p[:2].tolist() == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)], abs=1e-5)


# ---------------------------------------------------------------- InitNO


def test_initno_scores_on_hand_made_maps():
    # IN-1: peaks 0.70 and 0.45 -> the weakest subject's 1 - 0.45
    m = torch.zeros(2, 4, 4)
    m[0, 1, 2], m[1, 3, 0] = 0.70, 0.45
    assert cross_response(m).item() == pytest.approx(0.55)
    # IN-2: sum of min over sum of both; three subjects average their three pairs
    s1, s2, s3 = T([[0.4, 0.3], [0.2, 0.1]]), T([[0.1, 0.2], [0.3, 0.4]]), T([[0.0, 0.0], [0.5, 0.5]])
    assert self_conflict(torch.stack([s1, s2])).item() == pytest.approx(0.6 / (2.0 + 1e-6), abs=1e-7)
    assert self_conflict(torch.stack([s1, s2, s3])).item() == pytest.approx((0.3 + 0.15 + 0.35) / 3, abs=1e-6)
    assert self_conflict(s1[None]).item() == 0.0
    # IN-3: KL(N(mu, e^l) || N(0, 1)) per element: 0.5 (e^l + mu^2 - 1 - l)
    assert gaussian_kl(T([0.1]), T([0.0])).item() == pytest.approx(0.005)
    two = gaussian_kl(T([0.1, 0.0]), T([0.0, math.log(2)])).item()
    assert two == pytest.approx((0.005 + 0.5 * (1 - math.log(2))) / 2, abs=1e-7)


C4 = [[0.90, 0.80, 0.02, 0.02], [0.70, 0.02, 0.02, 0.60], [0.02, 0.02, 0.02, 0.75], [0.05, 0.02, 0.02, 0.02]]


def _otsu_brute(levels):
    """Between-class variance of every split, the first maximum (written independently of the library)."""
    best = None
    for t in sorted(set(levels)):
        lo = [v for v in levels if v <= t]
        hi = [v for v in levels if v > t]
        if not lo or not hi:
            continue
        var = len(lo) * len(hi) * (sum(lo) / len(lo) - sum(hi) / len(hi)) ** 2
        if best is None or var > best[0] + 1e-9:
            best = (var, t)
    return best[1]


def test_initno_clean_term_otsu_and_components():
    # IN-4: levels trunc(255 C): ten 5s, one 12, and 153..229; Otsu's first maximum is 12, so the 0.05 pixel joins
    # the foreground; the peak's 4-connected blob is {0.9, 0.8, 0.7}; the other blob's 0.75 > 0.70 is the penalty
    levels = [int(v * 255) for row in C4 for v in row]
    assert otsu_level(levels) == _otsu_brute(levels) == 12
    assert clean_term(T(C4)).item() == pytest.approx(0.75)
    lower = [row[:] for row in C4]
    lower[2][3] = 0.65  # now below the blob's minimum 0.70: no penalty
    assert clean_term(T(lower)).item() == 0.0
    flat = [[0.9, 0.05], [0.05, 0.05]]  # two levels: all foreground, one component, nothing outside
    assert clean_term(T(flat)).item() == 0.0
    for seed in range(5):  # Otsu against the brute-force rule on random levels
        lv = torch.randint(0, 256, (64,), generator=seeded(seed)).tolist()
        assert otsu_level(lv) == _otsu_brute(lv)


def _ctx(tokenizer, prompt, grid=(4, 4)):
    return ControlContext.simple(tokenizer, [prompt], (16, 16), grid, num_steps=30)


def _raw_maps(rows, cols, tokens, peaks: dict[int, tuple[int, int]]):
    """(1, rows, cols, tokens) attention: uniform, with each listed token strongly attended at one pixel."""
    m = torch.full((1, rows, cols, tokens), 0.01)
    for token, (r, c) in peaks.items():
        m[0, r, c, token] = 0.5
    return m


class _Evaluations:
    """Evaluates a prepared control on image 0 as the engine does: it hands back the state the control carried from
    its previous evaluation, and keeps the new one (InitNO's alignment average is its first item)."""

    def __init__(self, control):
        self.control, self.carry, self.last = control, [None], None

    def __call__(self, maps, step):
        self.last = self.control.evaluate(maps, [0], step, self.carry)
        if self.last.carry is not None:
            self.carry = self.last.carry
        return self.last

    @property
    def average(self):
        return self.carry[0][0]


def test_initno_alignment_term_follows_an_exponential_average(tokenizer):
    """At a refinement step the loss adds 0.1 * sum_s mean |C_s - avg_s|, avg <- 0.9 avg + 0.1 C (before use): the
    first call has no history (0); a second call on maps C' adds 0.1 * 0.9 * sum_s mean |C'_s - C_s|."""
    ctx = _ctx(tokenizer, "a cat and a dog")
    control = InitNO(subjects=["cat", "dog"]).prepare(ctx)
    selfmaps = torch.eye(16).reshape(1, 4, 4, 16)
    m1 = {MapKey("cross", (4, 4)): _raw_maps(4, 4, 77, {2: (0, 0), 5: (3, 3)}), MapKey("self", (4, 4)): selfmaps}
    m2 = {MapKey("cross", (4, 4)): _raw_maps(4, 4, 77, {2: (1, 1), 5: (3, 3)}), MapKey("self", (4, 4)): selfmaps}
    step = StepInfo(index=10, timestep=500.0, total=30)
    c1, c2 = (control.maps.per_image(m, [0])[0] for m in (m1, m2))
    evaluate = _Evaluations(control)
    first = evaluate(m1, step).loss.item()
    s = control.scores(m1, [0])[0]
    assert first == pytest.approx((s.cross + s.self_ + 0.1 * s.clean).item(), abs=1e-6)
    second = evaluate(m2, step).loss.item()
    s2 = control.scores(m2, [0])[0]
    align = 0.9 * (c2 - c1).abs().flatten(1).mean(1).sum().item()
    assert align > 0.01
    assert second == pytest.approx((s2.cross + s2.self_ + 0.1 * s2.clean).item() + 0.1 * align, abs=1e-6)
    # an ordinary step descends the cross score only
    assert evaluate(m2, StepInfo(index=3, timestep=800.0, total=30)).loss.item() == pytest.approx(s2.cross.item())


def test_initno_self_score_reads_the_peaks_self_attention(tokenizer):
    """Subjects peaking at pixels whose self-attention rows are disjoint do not conflict; identical rows give 1/2."""
    ctx = _ctx(tokenizer, "a cat and a dog")
    control = InitNO(subjects=["cat", "dog"], smooth_attentions=False).prepare(ctx)
    cross = _raw_maps(4, 4, 77, {2: (0, 0), 5: (3, 3)})
    apart = torch.eye(16).reshape(1, 4, 4, 16)
    same = torch.full((1, 4, 4, 16), 1 / 16)
    for selfmaps, expected in ((apart, 0.0), (same, 0.5)):
        maps = {MapKey("cross", (4, 4)): cross, MapKey("self", (4, 4)): selfmaps}
        assert control.scores(maps, [0])[0].self_.item() == pytest.approx(expected, abs=1e-5)


# The official rules, transcribed from xiefan-guo/initno, initno/pipelines/pipeline_sd_initno.py:
# fn_augmented_compute_losss runs at every evaluation (the step's, each refinement iteration's, the one after the
# loop) and updates the cache: alpha = 0.9; maps.clone() when it is None, else cache * alpha + maps * (1 - alpha).
def _official_cache(cache, maps, alpha=0.9):
    return maps.detach().clone() if cache is None else cache * alpha + maps.detach().clone() * (1 - alpha)


def _official_enters(cross, self_):  # __call__: (i == 10 or i == 20) and (cross_attn_loss > 0.2 or self_attn_loss > 0.3
    return cross > 0.2 or self_ > 0.3


def _official_continues(cross, self_, threshold=0.8):  # _perform_iterative_refinement_step(..., threshold=0.8)
    target_loss = max(0, 1.0 - threshold)
    target_self_loss = 0.3
    return cross > target_loss or self_ > target_self_loss


def _official_evaluations(ours, iterations):
    """The maps of the official code's evaluations at a refinement step, from ours: the step's evaluation, then
    (when it refines) iteration 1's of the same latents, the same maps, then ours after it."""
    return ours[:1] + ours[:1] + ours[1:] if iterations else ours


@pytest.mark.parametrize("mode", ["official", "once"])
def test_initno_alignment_cache_takes_a_refining_steps_maps_twice(tokenizer, mode):
    """Official: at step 10 the step's evaluation and refinement iteration 1's (same latents, same maps M0) each
    update the cache, so iteration 1 descends S_align against 0.81 C + 0.19 M0; the engine reuses the first
    evaluation as iteration 1, so the control applies the update twice there. Later evaluations update it once.
    ``alignment_cache="once"``: 0.9 C + 0.1 M0. A step that does not refine updates it once in both."""
    selfmaps = torch.eye(16).reshape(1, 4, 4, 16)

    def maps(peaks):
        return {MapKey("cross", (4, 4)): _raw_maps(4, 4, 77, peaks), MapKey("self", (4, 4)): selfmaps}

    m9, m10, m10b = maps({2: (0, 0), 5: (3, 3)}), maps({2: (1, 1), 5: (3, 2)}), maps({2: (2, 1), 5: (3, 3)})
    step9, step10 = StepInfo(index=9, timestep=550.0, total=30), StepInfo(index=10, timestep=500.0, total=30)
    control = InitNO(subjects=["cat", "dog"], alignment_cache=mode).prepare(_ctx(tokenizer, "a cat and a dog"))
    evaluate = _Evaluations(control)
    evaluate(m9, step9)
    c = evaluate.average.clone()
    m0, m1 = (control.maps.per_image(m, [0])[0] for m in (m10, m10b))
    s0 = control.scores(m10, [0])[0]
    assert _official_enters(s0.cross.item(), s0.self_.item())  # smoothed peaks ~0.6: this step refines
    loss = evaluate(m10, step10).loss.item()
    official = c
    for m in _official_evaluations([m0], iterations=1):
        official = _official_cache(official, m)
    assert torch.allclose(official, 0.81 * c + 0.19 * m0, atol=1e-7)
    expected = official if mode == "official" else _official_cache(c, m0)
    assert torch.equal(evaluate.average, expected)
    align = (m0 - expected).abs().flatten(1).mean(1).sum().item()
    assert loss == pytest.approx((s0.cross + s0.self_ + 0.1 * s0.clean).item() + 0.1 * align, abs=1e-6)
    evaluate(m10b, step10)  # iteration 2's evaluation, of the moved latents: one update
    assert torch.equal(evaluate.average, _official_cache(expected, m1))
    # unsmoothed peaks ~1 and disjoint self-attention: S_cross ~0, S_self 0, no refinement, one update
    sharp = InitNO(subjects=["cat", "dog"], alignment_cache=mode, smooth_attentions=False)
    sharp = sharp.prepare(_ctx(tokenizer, "a cat and a dog"))
    evaluate = _Evaluations(sharp)
    evaluate(m9, step9)
    c = evaluate.average.clone()
    s0 = sharp.scores(m10, [0])[0]
    assert not _official_enters(s0.cross.item(), s0.self_.item())
    evaluate(m10, step10)
    assert torch.equal(evaluate.average, _official_cache(c, sharp.maps.per_image(m10, [0])[0]))


@pytest.mark.parametrize("cross", [0.2, 0.19999999999999998, 0.19999999999999996, 0.20000000000000004, 0.25, 0.1])
def test_initno_refinement_tests_are_the_official_comparisons(tokenizer, monkeypatch, cross):
    """The official step enters refinement when ``cross > 0.2`` and its loop goes on while ``cross > 1.0 - 0.8``
    (0.19999999999999996): a cross score of 0.2 or 0.19999999999999998 does not start refinement, but keeps it
    going; 0.19999999999999996 does neither."""
    from attncontrol.controls.initno import Scores

    assert 1.0 - 0.8 == 0.19999999999999996
    control = InitNO(subjects=["cat", "dog"]).prepare(_ctx(tokenizer, "a cat and a dog"))
    zero = torch.zeros((), dtype=torch.float64)
    score = Scores(cross=torch.tensor(cross, dtype=torch.float64), self_=zero, clean=zero, maps=torch.zeros(2, 4, 4))
    monkeypatch.setattr(control, "scores", lambda maps, images: [score])
    step = StepInfo(index=10, timestep=500.0, total=30)
    evaluate, test = _Evaluations(control), control.plan(10).refine
    evaluate({}, step)  # the step's evaluation
    assert test(evaluate.last.row(0)) == _official_enters(cross, 0.0)
    evaluate({}, step)  # a refinement iteration's evaluation
    assert test(evaluate.last.row(0)) == _official_continues(cross, 0.0)
    assert control.plan(11).refine is None  # not a refinement step


def test_initno_engine_refinement_updates_the_cache_per_official_evaluation(sd1):
    """Through the engine on the tiny model (S_cross > 0.5: it refines): at refinement step 1 with 2 iterations the
    official code evaluates 4 times (the step, iteration 1 of the same latents, iteration 2, after the loop) where
    the engine evaluates 3 times; the cache after the step is the official one of those 4 evaluations' maps. The
    claim that iteration 1's evaluation gives the step's maps again: two forwards of the same latents are equal."""
    control = InitNO(subjects=["cat", "dog"], optimise=False, refinement_steps=(1,), max_refinement_steps=2)
    run = attncontrol.prepare_run(sd1, PROMPT, [control], num_inference_steps=10, guidance_scale=1.0)
    prepared = run.controls[0]
    seen, evaluate = [], prepared.evaluate

    def recording(maps, images, step, carry):
        seen.append((step.index, prepared.maps.per_image(maps, images)[0].detach().clone()))
        return evaluate(maps, images, step, carry)

    prepared.evaluate = recording
    z = torch.randn(1, 4, 32, 32, generator=seeded(5))
    with run.installed():
        z, _ = run.guide(z, 0)
        scale = run.adapter.input_scale(run.timesteps[1])
        again = [prepared.maps.per_image(run.engine.forward_maps(z * scale, 1, [0]), [0])[0] for _ in range(2)]
        assert torch.equal(again[0].detach(), again[1].detach())
        z, record = run.guide(z, 1)
    assert record.refinement_iterations == [2]
    at1 = [m for i, m in seen if i == 1]
    assert len(at1) == 3
    official = None
    for m in [m for i, m in seen if i == 0] + _official_evaluations(at1, iterations=2):
        official = _official_cache(official, m)
    assert torch.equal(run.engine.carry[prepared.name][0][0], official)  # the average the engine keeps


class _Scripted:
    """A stand-in for the optimisation: each call returns the next scripted (score, success) for the noise given."""

    def __init__(self, results):
        self.results, self.calls = list(results), []

    def __call__(self, eps, b, search, steps):
        from attncontrol.controls.initno import Optimised

        cross, success = self.results.pop(0)
        self.calls.append((float(eps.flatten()[0]), steps))
        return Optimised(noise=eps + 100, success=success, cross=cross, self_=0.1)


class _Draws:
    def __init__(self):
        self.n = 0

    def draw(self, b):
        self.n += 1
        return torch.full((1, 2), float(self.n))


@pytest.mark.parametrize(
    "results,chosen,calls",
    [
        ([(0.1, True)], 100.0, [(0.0, 10)]),  # the seed's noise succeeds: kept
        ([(0.9, False), (0.6, False), (0.15, True)], 102.0, [(0.0, 10), (1.0, 10), (2.0, 10)]),
        # every round fails: the best-scored round's original noise is re-optimised for 50 steps
        (
            [(0.9, False), (0.4, False), (0.7, False), (0.8, False), (0.6, False), (0.5, False)],
            101.0,
            [(0.0, 10), (1.0, 10), (2.0, 10), (3.0, 10), (4.0, 10), (1.0, 50)],
        ),
        # the official quirk: a failed round that scores lower than the successful one wins, then re-runs
        ([(0.05, False), (0.15, True), (0.5, False)], 100.0, [(0.0, 10), (1.0, 10), (0.0, 50)]),
    ],
)
def test_initno_rounds_and_selection(tokenizer, monkeypatch, results, chosen, calls):
    control = InitNO(subjects=["cat", "dog"]).prepare(_ctx(tokenizer, "a cat and a dog"))
    script = _Scripted(results)
    monkeypatch.setattr(control, "_optimise", script)
    noise, report = control._search(torch.zeros(1, 2), 0, _Draws())
    assert noise.flatten()[0].item() == chosen
    assert script.calls == calls
    assert report["rounds"] == sum(steps == 10 for _, steps in calls)
    assert ("final" in report) == (calls[-1][1] == 50)


# ---------------------------------------------------------------- words and groups, validation


def test_phrases_and_bindings_group_modifiers_with_their_noun(tokenizer):
    ctx = _ctx(tokenizer, "a shiny red car and a blue bird")
    prepared = SynGen(subjects=["red car", "bird"], bindings={"car": ["shiny"], "bird": ["blue"]}).prepare(ctx)
    # token positions: a 1, shiny 2, red 3, car 4, and 5, a 6, blue 7, bird 8
    assert prepared.groups == [[([(3,), (2,)], (4,)), ([(7,)], (8,))]]
    # each group is pushed away from every prompt token outside it, the other group's words included
    assert prepared.others == [[[1, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]]]
    conform = Conform(subjects=["red car", "blue bird"]).prepare(ctx)
    assert conform.tokens == [[3, 4, 7, 8]] and conform.labels == [[0, 0, 1, 1]]
    with pytest.raises(SubjectError, match="horse"):
        SynGen(subjects=["car"], bindings={"horse": ["red"]}).prepare(ctx)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: DivideBind(subjects=["cat"], tv="rows"), "tv must be 'official' or 'neighbour', got 'rows'"),
        (lambda: DivideBind(subjects=["cat"], attribute_levels="all"), "attribute_levels.*'all'"),
        (lambda: Conform(subjects=["cat"], temperature=0), "temperature must be > 0, got 0"),
        (lambda: SynGen(subjects=["cat"], step_size=-1), "step_size must be > 0, got -1"),
        (lambda: BoxDiff(boxes={"cat": (0, 0, 1.5, 1)}), r"inside \[0, 1\].*1.5"),
        (lambda: BoxDiff(boxes={"cat": [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]}), "one box per subject; 'cat' has 2"),
        (lambda: BoxDiff(boxes={"cat": (0, 0, 1, 1)}, top=0), r"top must be in \(0, 1\], got 0"),
        (lambda: InitNO(subjects=["cat"], rounds=0), "rounds must be between 1 and 1000, got 0"),
        (lambda: InitNO(subjects=["cat"], align_decay=1.0), r"align_decay must be in \[0, 1\), got 1.0"),
        (lambda: InitNO(subjects=["cat"], optimise=False, guide=False), "does nothing"),
        (lambda: InitNO(subjects=["cat"], alignment_cache="twice"), "alignment_cache must be 'official' or 'once'"),
    ],
)
def test_bad_options_name_the_value(make, match):
    with pytest.raises(OptionError, match=match):
        make()


# ---------------------------------------------------------------- on the tiny models


def _one_step(pipe, control, prompt, latents, step=0):
    run = attncontrol.prepare_run(pipe, prompt, [control], num_inference_steps=10, guidance_scale=1.0)
    with run.installed():
        before = run.engine.evaluate(latents, step).objective
        z2, record = run.guide(latents, step)
        after = run.engine.evaluate(z2, step).objective
    return before.item(), after.item(), record


PROMPT = "a red cat and a blue dog"
ONE_STEP = [
    DivideBind(subjects=["red cat", "blue dog"], scale_factor=2000, thresholds={}),
    Conform(subjects=["red cat", "blue dog"], scale_factor=400, refinement_steps=()),
    SynGen(subjects=["red cat", "blue dog"], step_size=2000),
    BoxDiff(boxes={"cat": (0, 0, 0.5, 1), "dog": (0.5, 0, 1, 1)}, scale_factor=400, thresholds={}),
    InitNO(subjects=["cat", "dog"], optimise=False, scale_factor=400),
]


@pytest.mark.parametrize("control", ONE_STEP, ids=[c.method for c in ONE_STEP])
def test_one_guidance_step_lowers_the_loss(sd1, control):
    z = torch.randn(1, 4, 32, 32, generator=seeded(3))
    before, after, record = _one_step(sd1, control, PROMPT, z)
    assert record.updated == [True]
    assert after < before


@pytest.mark.parametrize("control", ONE_STEP[:4], ids=[c.method for c in ONE_STEP[:4]])
def test_one_guidance_step_lowers_the_loss_on_sdxl(sdxl, control):
    z = torch.randn(1, 4, 32, 32, generator=seeded(4))
    run = attncontrol.prepare_run(sdxl, PROMPT, [control], num_inference_steps=10, guidance_scale=1.0)
    with run.installed():
        scale = run.adapter.input_scale(run.timesteps[0])
        before = run.engine.evaluate(z * scale, 0).objective.item()
        z2, record = run.guide(z, 0)
        after = run.engine.evaluate(z2 * scale, 0).objective.item()
    assert record.updated == [True] and after < before


def test_divide_bind_attribute_maps_come_from_the_finer_levels(tokenizer):
    """Attribute maps: the finer levels' maps nearest-resized to the subject grid (the official
    ``interpolate(mode="nearest")``: pixel (2i, 2j) of an 8x8 map at (i, j) of 4x4), then the token softmax."""
    ctx = _ctx(tokenizer, "a red cat")
    ctx.grids["cross"][(8, 8)] = ["fine-a", "fine-b"]
    prepared = DivideBind(subjects=["red cat"]).prepare(ctx)
    assert [k.grid for k in prepared.attribute_keys] == [(8, 8)]
    fine = torch.rand(1, 8, 8, 77, generator=seeded(0))
    maps = {MapKey("cross", (4, 4)): torch.rand(1, 4, 4, 77), MapKey("cross", (8, 8)): fine}
    got = prepared._attribute_probs(maps, [0])
    expected = token_softmax(fine[:, ::2, ::2, :], prepared.maps.keep[[0]])
    assert torch.allclose(got, expected, atol=1e-6)
    same = DivideBind(subjects=["red cat"], attribute_levels="same").prepare(ctx)
    assert [k.grid for k in same.attribute_keys] == [(4, 4)]
    # the subject map is the noun's (cat, 3) and the attribute is red (2)
    assert prepared.groups == [[([(2,)], (3,))]]


@pytest.mark.slow
def test_each_method_runs_end_to_end_and_restores_the_processors(sd1):
    before = processor_snapshot(sd1.unet)
    controls = [
        DivideBind(subjects=["red cat", "dog"], first_refinement_steps=2, max_refinement_steps=2),
        Conform(subjects=["red cat", "blue dog"], refinement_iterations=2, refinement_steps=(0, 4)),
        SynGen(subjects=["red cat", "blue dog"], stop=4),
        BoxDiff(boxes={"cat": (0, 0, 0.5, 1), "dog": (0.5, 0, 1, 1)}, max_refinement_steps=2),
        InitNO(
            subjects=["cat", "dog"],
            rounds=1,
            round_steps=2,
            final_steps=1,
            refinement_steps=(2,),
            max_refinement_steps=1,
        ),
    ]
    outs = {}
    for control in controls:
        out = attncontrol.generate(
            sd1, PROMPT, [control], num_inference_steps=6, generator=seeded(0), output_type="latent"
        )
        guided = [r.index for r in out.guided_steps]
        first, stop = control.window(6)
        assert guided == list(range(first, min(stop, 6))), control.method
        assert all(math.isfinite(r.loss[0]) for r in out.guided_steps)
        assert processor_snapshot(sd1.unet) == before
        outs[control.method] = out
    # Conform: exactly its fixed refinement count at its refinement steps, whatever the loss
    assert [r.refinement_iterations[0] for r in outs["conform"].trace] == [2, 0, 0, 0, 2, 0]
    # InitNO: its search is reported; the noise it chose is what sampling started from
    (report,) = outs["initno"].noise_search["initno"]
    assert report["rounds"] == 1 and report["steps"] <= 2 and report["kl"] <= 1e-3


def _search_run(pipe, control, seed):
    from attncontrol.run import NoiseSearch

    run = attncontrol.prepare_run(pipe, PROMPT, [control], num_inference_steps=10, generator=seeded(seed))
    return run, NoiseSearch(run)


def test_initno_optimisation_lowers_the_cross_score_and_stays_near_the_normal(sd1):
    """On the tiny model (attention nearly uniform, S_self gated off as S_cross > 0.5) the optimised quantity is
    S_cross + S_clean: it drops over 8 Adam steps for each noise, and the optimised noise keeps the KL bound
    (per element KL <= 1e-3: mean ~ 0, variance ~ 1, checked loosely on the 4096 values)."""
    control = InitNO(subjects=["cat", "dog"], lr=0.1)
    for seed in range(3):
        run, search = _search_run(sd1, control, seed)
        prepared = run.controls[0]
        with run.installed():
            eps = run.draw_latents()

            def objective(z, prepared=prepared, search=search):
                s = prepared.scores(search.maps(z, 0), [0])[0]
                assert s.cross.item() > 0.5  # the gate: S_self not optimised
                return (s.cross + s.clean).item()

            result = prepared._optimise(eps, 0, search, 8)
            assert result.kl <= 1e-3 and result.steps == 8
            assert objective(result.noise) < objective(eps.float())
        z = result.noise
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
        assert (z - eps).abs().max().item() > 1e-2  # it moved


def test_initno_kl_projection_brings_each_step_back_within_the_bound(tokenizer, monkeypatch):
    """A stand-in score ``1 - mean(z)`` pulls every element up; with lr 0.5 one Adam step makes the KL ~0.125, far
    above the bound, and the projection steps bring it back under 1e-3 after every update, leaving the noise
    shifted up (the objective still lowered)."""
    from attncontrol.controls.initno import Scores

    prepared = InitNO(subjects=["cat"], lr=0.5).prepare(_ctx(tokenizer, "a cat"))
    zero = torch.zeros(())

    def scores(maps, images):
        return [Scores(cross=1 - maps.mean(), self_=zero, clean=zero, maps=maps)]

    class Search:
        def maps(self, z, b):
            return z

    monkeypatch.setattr(prepared, "scores", scores)
    eps = torch.randn(1, 4, 8, 8, generator=seeded(0))
    result = prepared._optimise(eps, 0, Search(), 3)
    assert result.steps == 3 and 0 < result.kl <= 1e-3
    assert result.noise.mean().item() > eps.mean().item() + 0.01


def test_initno_draws_fresh_noise_from_the_generator(sd1):
    control = InitNO(subjects=["cat", "dog"])
    run, search = _search_run(sd1, control, 7)
    first = run.draw_latents()
    again = search.draw(0)
    g = seeded(7)
    expected = torch.randn(1, 4, 32, 32, generator=g)
    expected2 = torch.randn(1, 4, 32, 32, generator=g)
    assert torch.equal(first, expected) and torch.equal(again, expected2)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_each_method_runs_on_joint_attention(family, request):
    """SD3 and FLUX: every method reads its maps from the joint layers (FLUX's T5 words grouped by the
    sentencepiece rule), and InitNO's search forwards candidate noise through the transformer."""
    pipe = request.getfixturevalue(family)
    controls = [
        DivideBind(subjects=["red cat", "dog"], first_refinement_steps=1, max_refinement_steps=1),
        Conform(subjects=["red cat", "blue dog"], refinement_iterations=1),
        SynGen(subjects=["red cat", "blue dog"]),
        BoxDiff(boxes={"cat": (0, 0, 0.5, 1), "dog": (0.5, 0, 1, 1)}, max_refinement_steps=1),
        InitNO(subjects=["cat", "dog"], rounds=1, round_steps=2, final_steps=0, max_refinement_steps=1),
    ]
    size = dict(height=128, width=128)  # an 8x8 grid of image tokens (FLUX's own default is 1024 px, 64x64)
    for control in controls:
        out = attncontrol.generate(
            pipe, PROMPT, [control], num_inference_steps=3, generator=seeded(0), output_type="latent", **size
        )
        assert [r.index for r in out.guided_steps] == [0, 1, 2], control.method
        assert all(math.isfinite(r.loss[0]) for r in out.guided_steps)
    assert out.noise_search["initno"][0]["rounds"] == 1
