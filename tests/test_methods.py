"""A-STAR, Attention Refocusing, Attention Regulation: losses on hand-made maps whose answer is known, one
guidance step on the tiny model, composition, validation."""

import pytest
import torch

import attncontrol
from attncontrol import AStar, AttendExcite, Refocus, Regulate, SubjectError
from attncontrol.controls import parse_boxes
from attncontrol.losses import (
    CARWeights,
    binarize,
    box_mask,
    car_loss,
    gaussian_bumps,
    regulation_objective,
    retention_loss,
    sar_loss,
    segregation_loss,
    soft_iou,
)

from .conftest import processor_snapshot, seeded

LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


def _block(rows, cols, r0, r1, c0, c1, value=1.0):
    m = torch.zeros(rows, cols)
    m[r0:r1, c0:c1] = value
    return m


# ---------------------------------------------------------------- A-STAR


def test_segregation_zero_for_disjoint_and_half_per_pair_for_identical_maps():
    disjoint = torch.stack([_block(4, 8, 0, 4, 0, 4), _block(4, 8, 0, 4, 4, 8)])
    assert segregation_loss(disjoint).item() == 0.0
    same = torch.rand(4, 8)
    # min(a, a) / (a + a) = 1/2 for each of the 3 pairs of 3 identical maps: the maximum
    assert segregation_loss(torch.stack([same, same, same])).item() == pytest.approx(1.5)


def test_retention_against_a_shifted_previous_mask():
    a = _block(4, 8, 0, 4, 0, 4)  # 16 cells of 1
    shifted = _block(4, 8, 0, 4, 2, 6).bool()  # overlaps a on 8 cells
    # overlap = 8 / (16 + 16) = 0.25 -> retention 1 - 0.25
    assert retention_loss(a[None], shifted[None]).item() == pytest.approx(0.75)
    far = _block(4, 8, 0, 4, 4, 8).bool()
    assert retention_loss(a[None], far[None]).item() == pytest.approx(1.0)
    assert retention_loss(a[None], a[None].bool()).item() == pytest.approx(0.5)  # best case of the formula


def test_binarize_keeps_the_high_activation_region():
    m = torch.tensor([[0.1, 0.6], [1.0, 0.49]])
    assert binarize(m, 0.5).tolist() == [[False, True], [True, False]]
    assert soft_iou(m, m).item() == pytest.approx(0.5)


# ---------------------------------------------------------------- Refocus


def test_box_to_grid_rows_are_height():
    m = box_mask((0.0, 0.5, 0.25, 1.0), 4, 8)  # x0, y0, x1, y1: bottom-left quarter of width
    assert m.nonzero().tolist() == [[r, c] for r in (2, 3) for c in (0, 1)]
    assert box_mask((0.5, 0.5, 0.51, 0.51), 16, 16).sum() == 1  # a tiny box still covers a cell


def test_car_inside_term_is_zero_when_attention_lies_inside_its_box():
    maps = torch.zeros(2, 16, 16)
    maps[0, 5, 3] = 0.5  # subject 0 inside the left box, strong
    maps[1, 5, 12] = 0.4  # subject 1 inside the right box, strong
    loss, min_inside = car_loss(maps, [[LEFT], [RIGHT]], step=20)
    assert loss.item() == 0.0 and min_inside == pytest.approx(0.4)


def test_car_tiers_on_hand_made_maps():
    top_left, bottom_right = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)
    maps = torch.zeros(2, 16, 16)
    maps[0, 2, 2] = 0.5  # subject 0 strong inside its box
    maps[0, 12, 12] = 0.3  # ...and leaking into subject 1's box (> 0.15: weight 4)
    maps[1, 12, 12] = 0.05  # subject 1 weak inside its box (< 0.1: weight 6)
    maps[1, 2, 12] = 0.12  # ...and attention in the background (outside every box)
    loss, min_inside = car_loss(maps, [[top_left], [bottom_right]], step=20)
    # subject 0: inside 0 (strong, late), other box 4 * 0.3, background 0
    # subject 1: inside 6 * (1 - 0.05), other box 0 (0 is not > 0.1, late), background 1 * 0.12 / 2
    expected = (4 * 0.3 + 6 * 0.95 + 0.12 / 2) / 2
    assert loss.item() == pytest.approx(expected) and min_inside == pytest.approx(0.05)
    plain, _ = car_loss(maps, [[top_left], [bottom_right]], step=20, weights=CARWeights(tiered=False))
    assert plain.item() == pytest.approx(((1 - 0.5) + 0.3 + 0 + (1 - 0.05) + 0 + 0.12 / 2) / 2)
    early, _ = car_loss(maps, [[top_left], [bottom_right]], step=3)  # before step 15 mild terms count too
    assert early.item() == pytest.approx(expected + (1 - 0.5) / 2)


def test_sar_zero_for_block_diagonal_self_attention_matching_the_boxes():
    rows, cols = 4, 8
    left = box_mask(LEFT, rows, cols).flatten()
    attn = torch.zeros(rows * cols, rows * cols)
    for q in range(rows * cols):
        same = left if left[q] else ~left
        attn[q, same] = 1.0 / same.sum()
    assert sar_loss(attn.view(rows, cols, -1), [[LEFT], [RIGHT]]).item() == pytest.approx(0.0)
    uniform = torch.full((rows, cols, rows * cols), 1.0 / (rows * cols))
    # each box covers half the keys: half the mass is outside, for each of 2 boxes, / 2 subjects
    assert sar_loss(uniform, [[LEFT], [RIGHT]]).item() == pytest.approx(0.5)


def test_parse_boxes_and_box_validation():
    assert parse_boxes("cat=0.05,0.2,0.5,0.9; dog=0.55,0.2,0.95,0.9") == {
        "cat": [(0.05, 0.2, 0.5, 0.9)],
        "dog": [(0.55, 0.2, 0.95, 0.9)],
    }
    assert len(parse_boxes("cat=0,0,0.5,0.5;cat=0.5,0.5,1,1")["cat"]) == 2  # several boxes per subject
    with pytest.raises(ValueError, match="4 numbers"):
        parse_boxes("cat=0.1,0.2,0.3")
    with pytest.raises(ValueError, match="'cat=x0,y0,x1,y1'"):
        parse_boxes("0.1,0.2,0.3,0.4")
    with pytest.raises(ValueError, match=r"inside \[0, 1\].*1.2"):
        Refocus(boxes={"cat": (0.1, 0.1, 1.2, 0.5)})
    with pytest.raises(ValueError, match="x0 < x1"):
        Refocus(boxes={"cat": (0.6, 0.1, 0.5, 0.5)})
    with pytest.raises(ValueError, match="Refocus needs boxes"):
        Refocus(boxes={})


# ---------------------------------------------------------------- Regulation


def test_regulation_bumps_and_objective_on_known_maps():
    bumps = gaussian_bumps(16, 16)
    assert bumps.shape == (49, 16, 16)  # centres 2, 4, ..., 14 in each axis, sigma 1
    assert bumps[0, 2, 2] == 1.0 and bumps[0, 2, 3] == pytest.approx(torch.exp(torch.tensor(-0.5)).item())
    # one target whose map is 0.9 everywhere: quantile term 0, mean term 80 * (0.9 - 0.2)^2
    probs = torch.full((1, 256, 1), 0.9)
    w = torch.zeros(1, 49, 1)
    assert regulation_objective(probs, w).item() == pytest.approx(80 * 0.7**2)
    # two targets at 0.2 mean each (min(1, 0.4) / 2 = 0.2): only the quantile term (0.2 - 0.9)^2 remains
    probs2 = torch.full((3, 256, 2), 0.2)
    assert regulation_objective(probs2, w).item() == pytest.approx(0.7**2)


def test_regulation_editor_raises_the_targets_quantile(sd1):
    out = attncontrol.generate(
        sd1,
        "a cat and a dog",
        [Regulate(subjects=["cat", "dog"])],
        num_inference_steps=8,
        generator=seeded(0),
        output_type="latent",
        attention=["cat", "dog"],
    )
    edited = [r.edits["regulate"] for r in out.trace if r.edits.get("regulate")]
    assert len(edited) == 4  # the first half of the 8 steps
    for stats in edited:
        assert stats["quantile_after"] > stats["quantile_before"] + 0.1
    assert out.trace[5].edits["regulate"] == {}
    plain = attncontrol.generate(
        sd1,
        "a cat and a dog",
        [],
        num_inference_steps=8,
        generator=seeded(0),
        output_type="latent",
        attention=["cat", "dog"],
    )
    assert (out.images - plain.images).abs().max() > 1e-2
    # measured independently, by the observer on the ordinary forward of step 0 (same latents in both runs): the
    # attention probability the layers actually used for each target has a higher 0.9-quantile over pixels
    for subject in ("cat", "dog"):
        q_edit = torch.quantile(out.attention.map(subject, step=0, raw=True).flatten(), 0.9)
        q_plain = torch.quantile(plain.attention.map(subject, step=0, raw=True).flatten(), 0.9)
        assert q_edit > q_plain + 0.1, (subject, q_edit, q_plain)


# ---------------------------------------------------------------- on the tiny model


def _one_step(pipe, control, latents):
    """Loss before and after one guided step at step 0, on the same latents and timestep."""
    run = attncontrol.prepare_run(pipe, "a cat and a dog", [control], num_inference_steps=10, guidance_scale=1.0)
    with run.installed():
        before = run.engine.evaluate(latents, 0).objective
        z2, record = run.guide(latents, 0)
        after = run.engine.evaluate(z2, 0).objective
        maps_after = {"cross": run.store.maps((16, 16)).detach()}
        run.engine.evaluate(latents, 0)
        maps_before = {"cross": run.store.maps((16, 16)).detach()}
    return before.item(), after.item(), record, run.controls[0], maps_before, maps_after


@pytest.mark.parametrize(
    "control",
    [
        AStar(subjects=["cat", "dog"], scale_factor=400),
        Refocus(boxes={"cat": LEFT, "dog": RIGHT}, schedule=((10, 400.0, 1),)),
    ],
    ids=["astar", "refocus"],
)
def test_one_guidance_step_lowers_the_loss(sd1, control):
    z = torch.randn(1, 4, 32, 32, generator=seeded(5))
    before, after, record, _, _, _ = _one_step(sd1, control, z)
    assert record.updated == [True]
    assert after < before


def test_refocus_moves_attention_into_the_boxes(sd1):
    """Share of each subject's attention mass inside its box, after vs before Refocus's updates at step 0.
    CAR acts on peaks, so on the random tiny model a single subject's mass share can dip for one noise draw;
    over 8 draws each subject's mean share rises, and for every draw the subjects' mean share rises."""
    from attncontrol.ops import token_softmax

    left, right = box_mask(LEFT, 16, 16), box_mask(RIGHT, 16, 16)
    gains = []
    for seed in range(8):
        z = torch.randn(1, 4, 32, 32, generator=seeded(seed))
        control = Refocus(boxes={"cat": LEFT, "dog": RIGHT}, schedule=((10, 400.0, 4),))
        _, _, _, prepared, before, after = _one_step(sd1, control, z)

        def share(maps, token, mask, keep=prepared.maps.keep):
            probs = token_softmax(maps, keep)[0, ..., token]
            return (probs[mask].sum() / probs.sum()).item()

        gains.append([share(after["cross"], t, m) - share(before["cross"], t, m) for t, m in ((2, left), (5, right))])
    gains = torch.tensor(gains)  # (seeds, subjects): cat (token 2) in the left box, dog (token 5) in the right
    assert (gains.mean(0) > 0).all()
    assert (gains.mean(1) > 0).all()


def test_astar_retention_uses_the_previous_steps_mask(sd1):
    out = attncontrol.generate(
        sd1,
        "a cat and a dog",
        [AStar(subjects=["cat", "dog"])],
        num_inference_steps=4,
        generator=seeded(0),
        output_type="latent",
    )
    losses = [r.losses["astar"][0] for r in out.trace]
    # step 0: segregation only (< 1 for two maps); from step 1 on retention adds up to 1 per subject
    assert losses[0] < 0.5 < losses[1]
    assert all(r.updated == [True] for r in out.trace)  # every step by default


def test_composition_is_one_guidance_pass_per_step(sd1):
    before = processor_snapshot(sd1.unet)
    passes = []
    hook = sd1.unet.conv_in.register_forward_hook(lambda m, i, o: passes.append(torch.is_grad_enabled()))
    controls = [
        AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=4),
        AStar(subjects=["cat", "dog"], max_iter_to_alter=4),
        Refocus(boxes={"cat": LEFT, "dog": RIGHT}, schedule=((10, 3.0, 1),), early_steps=4, late_steps=()),
        Regulate(subjects=["cat", "dog"]),
    ]
    try:
        out = attncontrol.generate(
            sd1, "a cat and a dog", controls, num_inference_steps=8, generator=seeded(0), output_type="latent"
        )
    finally:
        hook.remove()
    assert passes.count(True) == 4  # one forward (and one backward) per guided step, not one per control
    for r in out.trace[:4]:
        assert set(r.losses) == {"attend-excite", "astar", "refocus"} and r.edits["regulate"]
    assert out.trace[5].loss is None
    assert processor_snapshot(sd1.unet) == before


def test_conflicts_and_bad_subjects_fail_early(sd1):
    with pytest.raises(ValueError, match="several attend-excite"):
        attncontrol.generate(sd1, "a cat", [AttendExcite(subjects=["cat"]), AttendExcite(subjects=["cat"])])
    with pytest.raises(SubjectError, match="Refocus boxes.*'horse'"):
        attncontrol.generate(sd1, "a cat and a dog", [Refocus(boxes={"horse": LEFT})])
    with pytest.raises(ValueError, match="mask_threshold"):
        AStar(subjects=["cat"], mask_threshold=1.5)
    with pytest.raises(ValueError, match=r"stop \(end\) must be after start"):
        Regulate(subjects=["cat"], end=0)
