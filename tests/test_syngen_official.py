"""SynGen against a transcription of the official code (RoyiRa/Linguistic-Binding-in-Diffusion-Models, HEAD
50b8eab): which tokens each group is pushed away from, and the loss and its gradient on hand-made maps.

The official rule, read from ``compute_loss.py`` and ``syngen_diffusion_pipeline.py`` and written out here
without our code:

* ``get_attention_map_index_to_wordpiece``: the candidate tokens are the positions ``1 .. len(ids) - 2`` of
  ``tokenizer(prompt).input_ids`` (no padding): every prompt token, without the start and end tokens.
* ``_get_outside_indices(subtree_indices, ...)``: for one group (modifiers then noun, a multi-piece word a list of
  positions), the candidates not in the group's flattened positions -- the other groups' words included.
* ``_symmetric_kl``: ``(KL(p||q) + KL(q||p)) / 2`` of ``torch.distributions.Categorical(probs=map)``, i.e. the
  map divided by its sum, weights unclamped, the logs of the probabilities clamped to ``[eps, 1 - eps]`` with
  ``eps`` float32's (the official pipeline runs in float32); a zero weight gives a zero term.
* ``_attribution_loss`` / ``_calculate_losses`` / ``calculate_positive_loss`` / ``calculate_negative_loss`` /
  ``_calculate_outside_loss``: summed over groups; per modifier ``m`` of noun ``n``:
  ``max_pieces d(m, n) + (-sum_u max_pieces d(m, u) / |U| - sum_u max_pieces d(n, u) / |U|) / 2`` over the group's
  outside tokens ``U``; a noun without modifiers: ``-sum_u max_pieces d(n, u) / |U|``; no outside tokens: 0.
"""

import itertools

import pytest
import torch

from attncontrol import SynGen
from attncontrol.controls import ControlContext, StepInfo

from .conftest import seeded

EPS32 = torch.finfo(torch.float32).eps  # torch.distributions.utils.clamp_probs on the official float32 maps


# ---------------------------------------------------------------- the official rule, transcribed


def official_candidates(tokenizer, prompt):
    """compute_loss.py:get_attention_map_index_to_wordpiece: positions 1 .. len(ids) - 2 (no SOT, no EOT)."""
    ids = tokenizer(prompt).input_ids
    return list(range(1, len(ids) - 1))


def _flat(subtree):
    return [p for item in subtree for p in (item if isinstance(item, list) else [item])]


def official_outside(tokenizer, prompt, subtree):
    """compute_loss.py:_get_outside_indices: every candidate not in this group."""
    mine = _flat(subtree)
    return [p for p in official_candidates(tokenizer, prompt) if p not in mine]


def official_kl(a, b):
    """compute_loss.py:_symmetric_kl in float64, Categorical's normalisation and clamp_probs at float32's eps."""
    p, q = a.double().flatten(), b.double().flatten()
    p, q = p / p.sum(), q / q.sum()
    lp, lq = p.clamp(EPS32, 1 - EPS32).log(), q.clamp(EPS32, 1 - EPS32).log()
    kl_pq = torch.where(p == 0, torch.zeros_like(p), p * (lp - lq)).sum()
    kl_qp = torch.where(q == 0, torch.zeros_like(q), q * (lq - lp)).sum()
    return (kl_pq + kl_qp) / 2


def official_loss(maps, subtrees, tokenizer, prompt):
    """syngen_diffusion_pipeline.py:_attribution_loss on ``maps`` (token -> 2-D map), ``subtrees`` as its
    ``_align_indices`` gives them (modifiers then the noun; a multi-piece word a list)."""

    def pieces(w):
        return w if isinstance(w, list) else [w]

    loss = torch.zeros((), dtype=torch.float64)
    for subtree in subtrees:
        noun, modifiers = subtree[-1], subtree[:-1]
        outside = official_outside(tokenizer, prompt, subtree)

        def negative(src, outside=outside):  # calculate_negative_loss's one side
            if not outside:
                return 0.0
            return -sum(max(official_kl(maps[t], maps[u]) for t in pieces(src)) for u in outside) / len(outside)

        if not modifiers:
            loss = loss + negative(noun)
            continue
        for m in modifiers:
            positive = max(official_kl(maps[s], maps[d]) for s, d in itertools.product(pieces(m), pieces(noun)))
            loss = loss + positive + (negative(m) + negative(noun)) / 2
    return loss


# ---------------------------------------------------------------- ours


def _prepared(tokenizer, prompt, grid=(16, 16), **kwargs):
    ctx = ControlContext.simple(tokenizer, [prompt], (64, 64), grid, num_steps=50)
    return SynGen(**kwargs).prepare(ctx)


def _maps(grid=(16, 16), seed=0, tiny=()):
    """(1, rows, cols, 77) raw averaged attention: a softmax over tokens per pixel, as the store averages."""
    logits = 2 * torch.randn(1, *grid, 77, generator=seeded(seed))
    m = logits.softmax(-1)
    for token in tiny:  # pixels whose probability is below float32's eps after the spatial normalisation
        m[0, : grid[0] // 2, :, token] = 1e-12
    return m


def _compare(tokenizer, prompt, subtrees, m, **kwargs):
    """(ours, official) loss, and the relative L2 difference of their gradients with respect to the maps."""
    prepared = _prepared(tokenizer, prompt, **kwargs)
    ours_in = m.clone().requires_grad_(True)
    ours = prepared.evaluate({prepared.maps.key: ours_in}, [0], StepInfo(0, 981.0, 50), [None]).loss[0]
    (g_ours,) = torch.autograd.grad(ours, ours_in)
    off_in = m.double().clone().requires_grad_(True)
    official = official_loss({t: 100 * off_in[0, ..., t] for t in range(77)}, subtrees, tokenizer, prompt)
    (g_off,) = torch.autograd.grad(official, off_in)
    rel = ((g_ours.double() - g_off).norm() / g_off.norm()).item()
    return ours.item(), official.item(), rel


# ---------------------------------------------------------------- tests


def test_each_group_is_pushed_away_from_every_token_outside_it(tokenizer):
    prompt = "a red car and a blue bowl"  # a 1, red 2, car 3, and 4, a 5, blue 6, bowl 7
    assert official_outside(tokenizer, prompt, [2, 3]) == [1, 4, 5, 6, 7]
    assert official_outside(tokenizer, prompt, [6, 7]) == [1, 2, 3, 4, 5]
    prepared = _prepared(tokenizer, prompt, subjects=["red car", "blue bowl"])
    assert prepared.groups == [[([(2,)], (3,)), ([(6,)], (7,))]]
    assert prepared.others == [[official_outside(tokenizer, prompt, s) for s in ([2, 3], [6, 7])]]
    # multi-piece words: glit|tery 2-3, hippo|griff 4-5; the group leaves out all four pieces
    prompt = "a glittery hippogriff and a blue bowl"
    prepared = _prepared(tokenizer, prompt, subjects=["glittery hippogriff", "blue bowl"])
    subtrees = [[[2, 3], [4, 5]], [8, 9]]
    assert prepared.others == [[official_outside(tokenizer, prompt, s) for s in subtrees]]
    assert prepared.others == [[[1, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7]]]


CASES = [
    # prompt, our options, the official subtrees (_align_indices' output for the same pairs)
    ("a red car and a blue bowl", {"subjects": ["red car", "blue bowl"]}, [[2, 3], [6, 7]]),
    ("a red car", {"subjects": ["red car"]}, [[2, 3]]),
    (
        "a shiny red car and a blue bird",
        {"subjects": ["red car", "bird"], "bindings": {"car": ["shiny"], "bird": ["blue"]}},
        [[3, 2, 4], [7, 8]],
    ),
    (
        "a glittery hippogriff and a blue bowl",
        {"subjects": ["glittery hippogriff", "blue bowl"]},
        [[[2, 3], [4, 5]], [8, 9]],
    ),
    ("a red car and a bowl", {"subjects": ["red car", "bowl"]}, [[2, 3], [6]]),  # a noun alone
]


@pytest.mark.parametrize("prompt,options,subtrees", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_equal_the_official(tokenizer, prompt, options, subtrees, seed):
    ours, official, rel = _compare(tokenizer, prompt, subtrees, _maps(seed=seed), **options)
    assert ours == pytest.approx(official, abs=1e-5)
    assert rel < 1e-4


def test_kl_clamps_only_the_logs_at_float32_eps(tokenizer):
    """Pixels whose spatial probability is far below float32's eps (half of blue's and of bowl's map at 1e-12):
    the official weights them by their own (unclamped) value and takes the log of eps."""
    prompt, subtrees = "a red car and a blue bowl", [[2, 3], [6, 7]]
    ours, official, rel = _compare(
        tokenizer, prompt, subtrees, _maps(seed=2, tiny=(6, 7)), subjects=["red car", "blue bowl"]
    )
    assert ours == pytest.approx(official, abs=1e-5)
    assert rel < 1e-4


def test_the_transcribed_kl_is_torch_distributions_on_float32_maps():
    """The transcription's KL against what the official code calls: Categorical(probs=...) and kl_divergence, on
    float32 maps scaled by 100 (``_get_attention_maps_list``), half of one map far below eps."""
    from torch.distributions import Categorical, kl_divergence

    m = _maps(seed=3, tiny=(2,))[0]
    for s, d in ((2, 3), (3, 2), (4, 5)):
        a, b = 100 * m[..., s].flatten(), 100 * m[..., d].flatten()
        p, q = Categorical(probs=a), Categorical(probs=b)
        expected = ((kl_divergence(p, q) + kl_divergence(q, p)) / 2).item()
        assert official_kl(a, b).item() == pytest.approx(expected, rel=1e-5)
