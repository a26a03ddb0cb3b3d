"""Refocus takes exactly the updates of the official ``SAR_CAR`` loop (Attention-Refocusing/attention-refocusing,
``ldm/models/diffusion/plms.py:update_loss_self_cross``), including when its stopping test ends a step early.

The official loop, at steps 0-9: ``loss = 1e4; min_inside = 0; while loss > 0.1 and it < max_iter and
min_inside < 0.2: evaluate x (loss, min_inside); x -= grad; it += 1``. So the first update is unconditional and
each later one is decided on the evaluation that drove the previous update. It is transcribed below as a plain
loop and run on a stand-in denoiser whose attention is a smooth function of the latents; the engine must make
the same number of updates and the same latents.
"""

import pytest
import torch

from attncontrol import AttendExcite, Refocus
from attncontrol.controls.base import ControlContext, StepInfo
from attncontrol.controls.vocabulary import MapKey
from attncontrol.guidance import GuidanceEngine
from attncontrol.losses import CARWeights, car_loss, sar_loss
from attncontrol.store import AttentionStore, AttnLayer

PROMPT = "a cat and a dog"
R = 4  # the stand-in's token grid
BOXES = {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}
STEPS = 50


class StandIn:
    """A denoiser stand-in: latents (b, 77, R, R) are the cross-attention logits of each token per pixel; the
    self-attention is a fixed Gaussian band. It records both into the store as the capture processors would."""

    def __init__(self, store: AttentionStore):
        self.store = store
        idx = torch.arange(R * R, dtype=torch.float64)
        self.self_probs = torch.softmax(-0.5 * (idx[:, None] - idx[None, :]) ** 2, dim=-1)

    def input_scale(self, t) -> float:
        return 1.0

    def guidance_forward(self, z, t, cond, attention_kwargs=None):
        b = z.shape[0]
        self.store.record("cross", torch.softmax(z.reshape(b, 77, R * R).transpose(1, 2), dim=-1), 1)
        self.store.record("self", self.self_probs.expand(b, R * R, R * R), 1)


def _engine(tokenizer, controls):
    ctx = ControlContext.simple(tokenizer, [PROMPT], (R, R), (R, R), STEPS)
    prepared = [c.prepare(ctx) for c in controls]
    layers = [AttnLayer("self", "self", "stand-in", 0, 0), AttnLayer("cross", "cross", "stand-in", 0, 1)]
    store = AttentionStore(layers, {"self": (R, R), "cross": (R, R)})
    engine = GuidanceEngine(StandIn(store), store, prepared, {}, torch.arange(STEPS, 0, -1, dtype=torch.float64))
    return engine, prepared, store


def _maps(engine, store, x):
    leaf = x.clone().requires_grad_(True)
    store.reset()
    store.active = True
    engine.adapter.guidance_forward(leaf, None, {})
    store.active = False
    return leaf, {
        MapKey("cross", (R, R)): store.maps((R, R), "cross"),
        MapKey("self", (R, R)): store.maps((R, R), "self"),
    }


def official_loop(tokenizer, z0, step):
    """The official SAR_CAR loop at an early step (< 10), on our CAR/SAR loss functions."""
    engine, (refocus,), store = _engine(tokenizer, [Refocus(boxes=BOXES)])
    scale, max_iter = refocus._scale_iters(step)
    x, it, loss, min_inside = z0.clone(), 0, 1e4, 0.0
    while loss > 0.1 and it < max_iter and min_inside < 0.2:
        leaf, maps = _maps(engine, store, x)
        subject_maps = refocus.maps.per_image(maps, [0])[0]
        car, min_inside = car_loss(subject_maps, refocus.boxes, step, CARWeights())
        total = scale * (car + sar_loss(maps[MapKey("self", (R, R))][0], refocus.boxes))
        loss = float(total.detach())
        (grad,) = torch.autograd.grad(total, [leaf])
        x = (leaf - grad).detach()
        it += 1
    return x, it, max_iter


def _start(seed: int, cat_offset: float) -> torch.Tensor:
    z = 0.5 * torch.randn(1, 77, R * R, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z[:, 2] += cat_offset  # token 2 is "cat"
    return z.reshape(1, 77, R, R)


# (seed, cat offset) -> official updates at step 3 (max 6): stopped by the test after 2, 3 and 5; capped at 6
CASES = [(1, 0.0, 2), (1, 0.5, 3), (0, 0.5, 5), (0, 0.0, 6)]


@pytest.mark.parametrize("seed,offset,expected", CASES)
def test_refocus_makes_the_official_number_of_updates(tokenizer, seed, offset, expected):
    torch.set_default_dtype(torch.float64)
    try:
        z0 = _start(seed, offset)
        x_official, count, max_iter = official_loop(tokenizer, z0, step=3)
        assert count == expected and max_iter == 6
        engine, _, _ = _engine(tokenizer, [Refocus(boxes=BOXES)])
        x_ours, record = engine.guide(z0.clone(), 3)
    finally:
        torch.set_default_dtype(torch.float32)
    ours = record.refinement_iterations[0] + int(record.updated[0])
    assert ours == count
    torch.testing.assert_close(x_ours, x_official, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed,offset,expected", [c for c in CASES if c[2] < 6])
def test_with_attend_and_excite_each_follows_its_own_rule(tokenizer, seed, offset, expected):
    """A&E (no refinement at this step) + Refocus: Refocus's refinement runs its official course and, having been
    stopped by its own test, takes no final update; A&E takes its one regular update, after refinement."""
    torch.set_default_dtype(torch.float64)
    try:
        z0 = _start(seed, offset)
        x_refocus, count, _ = official_loop(tokenizer, z0, step=3)
        ae = AttendExcite(subjects=["cat", "dog"], thresholds={})
        engine, prepared, store = _engine(tokenizer, [Refocus(boxes=BOXES), ae])
        x_ours, record = engine.guide(z0.clone(), 3)
        # the hand-written composition: the official Refocus loop, then one A&E step from where it ended
        ae_prepared = prepared[1]
        leaf, maps = _maps(engine, store, x_refocus)
        loss = ae_prepared.evaluate(maps, [0], StepInfo(3, 0.0, STEPS), [None]).loss[0] * ae_prepared.plan(3).step_size
        (grad,) = torch.autograd.grad(loss, [leaf])
        expected_x = (leaf - grad).detach()
    finally:
        torch.set_default_dtype(torch.float32)
    assert count == expected
    assert record.refinement_iterations == [count] and record.updated == [True]
    assert (expected_x - x_refocus).abs().max() > 1e-6  # A&E's step is real
    torch.testing.assert_close(x_ours, expected_x, rtol=0, atol=1e-12)
