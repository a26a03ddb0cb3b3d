"""Each official constant pinned by a value derived by hand, so that changing it fails a test: Refocus's late
step and inside threshold (in the loss and in the refinement decision), SAR's share of the control's loss,
Regulate's decay, blend and objective weights and what it leaves unedited, and the sign and precision of the
latent update. Every expected number below is worked out in the comment beside it, not read from the code."""

import math

import pytest
import torch

from attncontrol import Refocus, Regulate
from attncontrol.controls.base import ControlContext, StepInfo
from attncontrol.controls.vocabulary import MapKey
from attncontrol.guidance import GuidanceEngine
from attncontrol.losses import CARWeights, car_loss, gaussian_bumps
from attncontrol.store import AttentionStore, AttnLayer

PROMPT = "a cat and a dog"  # tokens: 0 <start>, 1 a, 2 cat, 3 and, 4 a, 5 dog, 6 <end>, 7.. padding
CAT, DOG = 2, 5
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


# ---------------------------------------------------------------- Refocus: CAR on a hand-made map


def _one_peak(value: float, rows: int = 4, cols: int = 4) -> torch.Tensor:
    """One subject's map: ``value`` at the top-left cell (inside LEFT), 0 elsewhere (so 0 outside every box)."""
    m = torch.zeros(1, rows, cols, dtype=torch.float64)
    m[0, 0, 0] = value
    return m


def test_late_step_15_drops_the_mild_inside_term():
    """A peak of 0.5 inside its box is above both inside tiers (0.1, 0.2): before step 15 the mild term adds
    1 - 0.5 = 0.5; from step 15 on it adds nothing. Nothing lies outside the box, so that is the whole loss."""
    boxes = [[LEFT]]
    assert car_loss(_one_peak(0.5), boxes, step=14)[0].item() == pytest.approx(0.5, abs=1e-12)
    assert car_loss(_one_peak(0.5), boxes, step=15)[0].item() == 0.0


def test_inside_threshold_0_2_in_the_loss():
    """At step 20 (late): a peak of 0.22 (>= 0.2) is left alone: 0; a peak of 0.18 (in [0.1, 0.2)) adds
    1 * (1 - 0.18) = 0.82."""
    boxes = [[LEFT]]
    assert car_loss(_one_peak(0.22), boxes, step=20)[0].item() == 0.0
    assert car_loss(_one_peak(0.18), boxes, step=20)[0].item() == pytest.approx(0.82, abs=1e-12)
    # the tier's edge to within 0.001 (a threshold of 0.21 or 0.19 fails here)
    assert car_loss(_one_peak(0.201), boxes, step=20)[0].item() == 0.0
    assert car_loss(_one_peak(0.199), boxes, step=20)[0].item() == pytest.approx(0.801, abs=1e-12)
    # and the strong tier below 0.1: 6 * (1 - 0.05) = 5.7
    assert car_loss(_one_peak(0.05), boxes, step=20)[0].item() == pytest.approx(5.7, abs=1e-12)
    assert CARWeights().late_step == 15


# ---------------------------------------------------------------- Refocus: the control, driven through loss()

R = 4


def _cross_logits(peaks: dict[int, float], rows: int = R, cols: int = R) -> torch.Tensor:
    """Raw cross-attention maps (1, rows, cols, 77) whose token softmax (scale 100) is known exactly: at the top-
    left cell the cat token gets ``peaks[CAT]`` and the dog token the rest; at every other cell of the left half
    the dog token gets everything, and on the right half the dog token too. Every other token sits at -100
    (exp(-10000) = 0 in float64), so the result does not depend on which tokens the softmax keeps."""
    maps = torch.full((1, rows, cols, 77), -100.0, dtype=torch.float64)
    maps[..., DOG] = 0.0
    p = peaks[CAT]
    maps[0, 0, 0, CAT] = math.log(p) / 100
    maps[0, 0, 0, DOG] = math.log(1 - p) / 100
    return maps


def _self_maps(kind: str, rows: int = R, cols: int = R) -> torch.Tensor:
    """(1, rows, cols, rows*cols) self-attention: "uniform" (every key 1/16) or "halves" (block-diagonal: the
    left-half pixels attend only to left-half keys, uniformly; likewise the right half)."""
    n = rows * cols
    if kind == "uniform":
        probs = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    else:
        left = (torch.arange(n) % cols) < cols // 2
        same = left[:, None] == left[None, :]
        probs = same.double() / same.sum(1, keepdim=True)
    return probs.reshape(1, rows, cols, n)


def _prepared_refocus(tokenizer, boxes, **kw):
    ctx = ControlContext.simple(tokenizer, [PROMPT], (R, R), (R, R), 50)
    return Refocus(boxes=boxes, smooth_attentions=False, attn_res=(R, R), **kw).prepare(ctx)


def _refocus_row(prepared, peak: float, self_kind: str, step: int):
    """The control's evaluation of one image: its loss and the statistics its step plan reads."""
    maps = {MapKey("cross", (R, R)): _cross_logits({CAT: peak}), MapKey("self", (R, R)): _self_maps(self_kind)}
    return prepared.evaluate(maps, [0], StepInfo(step, 0.0, 50), [None]).row(0)


def _refocus_loss(prepared, peak: float, self_kind: str, step: int) -> float:
    return _refocus_row(prepared, peak, self_kind, step).loss


def test_refocus_refinement_decision_at_step_15_uses_inside_threshold_0_2(tokenizer):
    """Step 15 is a late guided step (official: every 5th from 10): refinement continues only while the weakest
    box peak is below 0.2. The loss the control reports is CAR + SAR; with block-diagonal self-attention SAR is
    0, so it is the CAR of the tests above: 0 for a peak of 0.22, 1 - 0.18 = 0.82 for 0.18."""
    prepared = _prepared_refocus(tokenizer, {"cat": LEFT})
    plan = prepared.plan(15)
    assert plan.update and plan.refine is not None
    strong = _refocus_row(prepared, 0.22, "halves", 15)
    assert strong.loss == pytest.approx(0.0, abs=1e-12)
    assert not plan.refine(strong)  # 0.22 >= 0.2: stop
    weak = _refocus_row(prepared, 0.18, "halves", 15)
    assert weak.loss == pytest.approx(0.82, abs=1e-12)
    assert plan.refine(weak)  # 0.18 < 0.2: go on
    # the edge to within 0.001: a threshold of 0.21 or 0.19 fails here
    assert not plan.refine(_refocus_row(prepared, 0.201, "halves", 15))
    assert plan.refine(_refocus_row(prepared, 0.199, "halves", 15))


def test_refocus_loss_is_car_plus_exactly_sar(tokenizer):
    """Two subjects, cat LEFT and dog RIGHT, on a 4x4 grid (8 pixels per box). Uniform self-attention puts
    8/16 = 0.5 of each inside pixel's mass outside its box: SAR = (0.5 + 0.5) / 2 subjects = 0.5. Block-diagonal
    self-attention by halves puts none outside: SAR = 0. The cross maps are the same, so the control's losses
    differ by exactly 0.5; without SAR (self_weight 0) they are equal."""
    boxes = {"cat": LEFT, "dog": RIGHT}
    with_sar = _prepared_refocus(tokenizer, boxes)
    diff = _refocus_loss(with_sar, 0.3, "uniform", 3) - _refocus_loss(with_sar, 0.3, "halves", 3)
    assert diff == pytest.approx(0.5, abs=1e-12)
    no_sar = _prepared_refocus(tokenizer, boxes, self_weight=0.0)
    assert _refocus_loss(no_sar, 0.3, "uniform", 3) == _refocus_loss(no_sar, 0.3, "halves", 3)


# ---------------------------------------------------------------- Regulate

G = 16  # the official 16x16 level: 49 bumps of sigma 1


def _prepared_regulate(tokenizer, **kw):
    ctx = ControlContext.simple(tokenizer, [PROMPT], (2 * G, 2 * G), (G, G), 50)
    return Regulate(subjects=["cat", "dog"], attn_res=(G, G), **kw).prepare(ctx)


def _scores(heads: int = 2, seed: int = 0) -> torch.Tensor:
    """(2 batch x heads, G*G queries, 77 keys) logits: [unconditional; conditional] as the pipeline batches them."""
    return torch.randn(2 * heads, G * G, 77, generator=torch.Generator().manual_seed(seed))


def _initial_bias(heads: int, seed: int = 0) -> torch.Tensor:
    """The first random weights Regulate draws (uniform [0, 1), its seeded generator), as a bias on the two
    targets: sum over bumps c of bump_c(pixel) * w[head, c, target]. Shape (heads, pixels, 2)."""
    bumps = gaussian_bumps(G, G).flatten(1)
    assert bumps.shape[0] == 49  # centres 2, 4, ..., 14 in each direction
    w = torch.rand(heads, 49, 2, generator=torch.Generator().manual_seed(seed))
    return torch.einsum("cp,hck->hpk", bumps, w), w


def _objective_by_hand(target_probs: torch.Tensor, w: torch.Tensor) -> float:
    """The paper's objective with the official constants written out: 1 * mean((q_0.9 - 0.9)^2)
    + 80 * mean((mean - min(1, 0.2 * 2) / 2)^2) + 0.09 * mean(w^2), quantiles and means over pixels."""
    q = torch.quantile(target_probs.double(), 0.9, dim=1)
    mean = target_probs.double().mean(1)
    return float(((q - 0.9) ** 2).mean() + 80 * ((mean - 0.2) ** 2).mean() + 0.09 * (w.double() ** 2).mean())


def test_regulate_with_lr_0_applies_the_decayed_seeded_bias_and_reports_the_objective(tokenizer):
    """With lr = 0 every iteration keeps the initial weights, so the best bias is the seeded one; at the first
    edited step the 'previous' bias is that same one, so the blend changes nothing and the applied bias is
    0.99**3 * bias at step 3. The reported loss is the objective of the undecayed biased probabilities."""
    heads = 2
    prepared = _prepared_regulate(tokenizer, lr=0.0)
    scores = _scores(heads)
    prepared.begin_step(3)
    probs = prepared.edit("layer", scores, heads)
    bias, w = _initial_bias(heads)
    cond = scores[heads:].clone()
    cond[..., [CAT, DOG]] += 0.99**3 * bias
    expected = torch.softmax(cond, dim=-1)
    plain = torch.softmax(scores, dim=-1)
    # start (0) and end (6) of text are restored to the unedited softmax; every other column is the edited one
    expected[..., [0, 6]] = plain[heads:][..., [0, 6]]
    torch.testing.assert_close(probs[heads:], expected, rtol=1e-5, atol=1e-7)
    undecayed = scores[heads:].clone()
    undecayed[..., [CAT, DOG]] += bias
    reported = prepared.step_stats()["loss"]
    assert reported == pytest.approx(_objective_by_hand(torch.softmax(undecayed, -1)[..., [CAT, DOG]], w), rel=1e-5)


def test_regulate_blends_a_quarter_of_the_previous_steps_bias(tokenizer):
    """Step 4 after step 3 (lr = 0): applied = 0.99**4 * (0.75 * this step's draw + 0.25 * step 3's draw)."""
    heads = 1
    prepared = _prepared_regulate(tokenizer, lr=0.0)
    scores = _scores(heads, seed=1)
    gen = torch.Generator().manual_seed(0)
    bumps = gaussian_bumps(G, G).flatten(1)
    draws = [torch.einsum("cp,hck->hpk", bumps, torch.rand(heads, 49, 2, generator=gen)) for _ in range(2)]
    for step in (3, 4):
        prepared.begin_step(step)
        probs = prepared.edit("layer", scores, heads)
    cond = scores[heads:].clone()
    cond[..., [CAT, DOG]] += 0.99**4 * (0.75 * draws[1] + 0.25 * draws[0])
    torch.testing.assert_close(probs[heads:][..., [CAT, DOG]], torch.softmax(cond, -1)[..., [CAT, DOG]])


def test_regulate_leaves_start_end_and_the_unconditional_half_exactly_unedited(tokenizer):
    heads = 2
    prepared = _prepared_regulate(tokenizer)  # the official lr and iterations
    scores = _scores(heads, seed=2)
    prepared.begin_step(0)
    probs = prepared.edit("layer", scores, heads)
    plain = torch.softmax(scores, dim=-1)
    assert torch.equal(probs[:heads], plain[:heads])  # the unconditional half, bit for bit
    assert torch.equal(probs[heads:][..., [0, 6]], plain[heads:][..., [0, 6]])  # <start>, <end>
    assert not torch.allclose(probs[heads:][..., [CAT, DOG]], plain[heads:][..., [CAT, DOG]])  # it did edit
    # the official code does not restore start/end: then those columns move with the renormalisation
    unrestored = _prepared_regulate(tokenizer, restore_special=False)
    unrestored.begin_step(0)
    moved = unrestored.edit("layer", scores, heads)
    assert not torch.equal(moved[heads:][..., 0], plain[heads:][..., 0])


# ---------------------------------------------------------------- the latent update: sign and precision


class _NoDenoiser:
    def input_scale(self, t) -> float:
        return 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_update_is_z_minus_grad_exactly_in_every_precision(dtype):
    """Objective sum(z**2) per image: grad = 2z, so z - grad = -z, exactly representable in every dtype (a
    '+ grad' would give 3z). Half-precision latents are updated in float32 and stored back."""
    store = AttentionStore([AttnLayer("cross", "cross", "stand-in", 0, 1)], {"cross": (2, 2)})
    engine = GuidanceEngine(_NoDenoiser(), store, [], {}, torch.arange(4, 0, -1))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    leaf = z.clone().requires_grad_(True)
    objective = (leaf.float() ** 2).flatten(1).sum(1)
    out = z.clone()
    moved = engine._step(out, [0, 1], leaf, objective, 0)
    assert moved == [True, True]
    assert out.dtype == dtype and torch.equal(out, -z)
