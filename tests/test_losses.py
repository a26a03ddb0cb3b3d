import math

import pytest
import torch

from attncontrol.losses import attend_excite_loss, subject_max_attention
from attncontrol.ops import gaussian_kernel, gaussian_smooth, token_softmax


def test_gaussian_kernel_is_the_reference_formula():
    # exp(-((x - 1) / (2 * 0.5)) ** 2) on x = 0, 1, 2 -> e^-1, 1, e^-1 per axis; outer product; normalised.
    e = math.exp(-1.0)
    axis = torch.tensor([e, 1.0, e])
    expected = torch.outer(axis, axis) / (1 + 2 * e) ** 2
    torch.testing.assert_close(gaussian_kernel(3, 0.5), expected)
    assert gaussian_kernel(5, 1.0).sum().item() == pytest.approx(1.0)


def test_gaussian_smooth_keeps_constants_and_spreads_a_delta():
    flat = torch.full((2, 6, 5), 0.3)
    torch.testing.assert_close(gaussian_smooth(flat), flat)
    delta = torch.zeros(7, 7)
    delta[3, 3] = 1.0
    out = gaussian_smooth(delta)
    torch.testing.assert_close(out[2:5, 2:5], gaussian_kernel(3, 0.5))
    assert out.sum().item() == pytest.approx(1.0)


def test_smoothing_matches_diffusers_reference_module():
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (  # noqa: E501
        GaussianSmoothing,
    )

    x = torch.rand(16, 16)
    ref = GaussianSmoothing()(torch.nn.functional.pad(x[None, None], (1, 1, 1, 1), mode="reflect"))[0, 0]
    torch.testing.assert_close(gaussian_smooth(x), ref)


def test_masked_token_softmax_equals_sliced_softmax():
    maps = torch.rand(2, 4, 4, 77)
    keep = torch.zeros(2, 77, dtype=torch.bool)
    keep[:, 1:76] = True
    probs = token_softmax(maps, keep)
    sliced = torch.softmax(maps[..., 1:-1] * 100, dim=-1)
    torch.testing.assert_close(probs[..., 1:-1], sliced)
    assert probs[..., 0].abs().max() == 0 and probs[..., 76].abs().max() == 0


def test_loss_on_hand_made_maps():
    probs = torch.zeros(4, 4, 5)
    probs[..., 1] = 0.2
    probs[1, 1, 1] = 0.9  # subject A peaks at 0.9
    probs[..., 2] = 0.3  # subject B is flat at 0.3
    peaks = subject_max_attention(probs, [(1,), (2,)], smooth=False)
    torch.testing.assert_close(peaks, torch.tensor([0.9, 0.3]))
    # only the most neglected subject counts: 1 - 0.3
    assert attend_excite_loss(peaks).item() == pytest.approx(0.7)
    # a phrase sums its tokens' maps: 0.2 + 0.3 everywhere, 0.9 + 0.3 at the peak
    assert subject_max_attention(probs, [(1, 2)], smooth=False).item() == pytest.approx(1.2)
    # every subject above 1 -> no loss at all
    assert attend_excite_loss(torch.tensor([1.2, 1.0])).item() == 0.0


def test_loss_gradient_goes_to_the_weakest_subject_only():
    probs = torch.rand(4, 4, 3, requires_grad=True)
    with torch.no_grad():
        probs[..., 2] *= 0.1
    peaks = subject_max_attention(probs, [(1,), (2,)])
    attend_excite_loss(peaks).backward()
    assert probs.grad[..., 1].abs().sum() == 0
    assert probs.grad[..., 2].abs().sum() > 0


def test_max_attention_matches_diffusers_reference():
    from diffusers import StableDiffusionAttendAndExcitePipeline

    maps = torch.rand(16, 16, 77)
    ref = StableDiffusionAttendAndExcitePipeline._compute_max_attention_per_index(maps.clone(), [2, 5])
    keep = torch.zeros(1, 77, dtype=torch.bool)
    keep[:, 1:76] = True
    probs = token_softmax(maps[None], keep)[0]
    ours = subject_max_attention(probs, [(2,), (5,)])
    torch.testing.assert_close(ours, torch.stack(ref))
