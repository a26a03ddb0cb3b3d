"""Our Attend-and-Excite equals diffusers' StableDiffusionAttendAndExcitePipeline (the oracle) on the same
tiny model, seed and settings. In float64 the two agree to rounding (~1e-13): any difference in the method
(maps, softmax, smoothing, step sizes, refinement, thresholds) would show up far above 1e-9. In float32 the
method's own dynamics amplify rounding (a 1e-7 change of the initial noise moves the reference's output by
~5e-5), so there the bar is the issue's 1e-4, against an effect of the method that is >1e-2."""

import pytest
import torch

import attncontrol
from attncontrol.testing import make_scheduler

from .conftest import ae_reference, seeded

REFINE_20 = {0: 0.05, 5: 0.5, 10: 0.8}


def _both(pipe, prompt, indices, subjects, steps=20, plain=False, ref_kwargs=None, ctl_kwargs=None, **kwargs):
    ref_kwargs = {**(ref_kwargs or {}), **kwargs}
    ctl_kwargs = ctl_kwargs or {}
    ref = ae_reference(pipe)(
        prompt,
        token_indices=indices,
        num_inference_steps=steps,
        generator=seeded(0),
        output_type="latent",
        attn_res=(16, 16),
        **ref_kwargs,
    ).images
    control = attncontrol.AttendExcite(
        subjects=subjects,
        attn_res=16,
        **ctl_kwargs,
        **{k: v for k, v in kwargs.items() if k != "num_images_per_prompt"},
    )
    ours = attncontrol.generate(
        pipe,
        prompt,
        [control],
        num_inference_steps=steps,
        generator=seeded(0),
        output_type="latent",
        num_images_per_prompt=kwargs.get("num_images_per_prompt", 1),
    )
    base = None
    if plain:
        base = pipe(
            prompt,
            num_inference_steps=steps,
            generator=seeded(0),
            output_type="latent",
            num_images_per_prompt=kwargs.get("num_images_per_prompt", 1),
        ).images
    return ours, ref, base


@pytest.mark.parametrize(
    "scheduler,subjects,thresholds",
    [("ddim", ["cat", "dog"], {}), ("pndm", [2, 5], REFINE_20), ("ddim", [2, "dog"], REFINE_20)],
)
def test_float32_equals_diffusers(sd1, scheduler, subjects, thresholds):
    sd1.scheduler = make_scheduler(scheduler)
    ours, ref, plain = _both(
        sd1, "a cat and a dog", [2, 5], subjects, thresholds=thresholds, max_iter_to_alter=10, plain=True
    )
    assert (ref - plain).abs().max() > 1e-2  # the method changes the result...
    assert (ours.images - ref).abs().max() < 1e-4  # ...and ours changes it the same way
    if thresholds:
        assert ours.trace[0].refinement_iterations[0] > 0


@pytest.mark.parametrize("scheduler", ["ddim", "pndm"])
def test_float64_equals_diffusers_to_rounding(sd1, scheduler):
    sd1.to(torch.float64)
    sd1.scheduler = make_scheduler(scheduler)
    ours, ref, _ = _both(sd1, "a cat and a dog", [2, 5], ["cat", "dog"], thresholds=REFINE_20, max_iter_to_alter=10)
    assert (ours.images - ref).abs().max() < 1e-9
    assert sum(ours.trace[i].refinement_iterations[0] for i in REFINE_20) > 0  # refinement was exercised


def test_float64_sd2_family_other_prompt_and_settings(sd2):
    sd2.to(torch.float64)
    # upcast_attention computes attention scores in float32 even in a float64 model, which would put float32
    # rounding back in; it is switched off here and exercised by the float32 SD2 test below.
    for module in sd2.unet.modules():
        if hasattr(module, "upcast_attention"):
            module.upcast_attention = False
    sd2.scheduler = make_scheduler("pndm")
    ours, ref, _ = _both(
        sd2,
        "a red car and a blue bench",
        [3, 7],
        ["car", "bench"],
        steps=16,
        thresholds={0: 0.9, 3: 0.6},
        max_iter_to_alter=8,
        scale_factor=10,
        ctl_kwargs={"exclude_eot": False},
    )
    assert (ours.images - ref).abs().max() < 1e-9


def test_float64_prompt_list_and_several_images_per_prompt(sd1):
    """Guidance is batched over 4 images; each still gets its own refinement decision, as in the per-image loop."""
    sd1.to(torch.float64)
    prompts = ["a cat and a dog", "a frog with a crown"]
    ours, ref, _ = _both(
        sd1,
        prompts,
        [[2, 5], [2, 5]],
        [["cat", "dog"], ["frog", "crown"]],
        steps=12,
        thresholds={0: 0.3, 4: 0.5},
        max_iter_to_alter=6,
        num_images_per_prompt=2,
    )
    assert ours.images.shape[0] == 4
    assert (ours.images - ref).abs().max() < 1e-9
    assert len(ours.trace[0].loss) == 4


def test_float64_non_default_schedule(sd1):
    sd1.to(torch.float64)
    ours, ref, _ = _both(
        sd1,
        "a bird and a bear",
        [2, 5],
        ["bird", "bear"],
        steps=10,
        thresholds={0: 0.95, 2: 0.9},
        max_iter_to_alter=4,
        scale_factor=35,
    )
    assert (ours.images - ref).abs().max() < 1e-9
    assert ours.trace[0].refinement_iterations == [20]  # 0.95 is out of reach: the reference's cap of 20


def test_float32_sd2_family_with_sdpa_elsewhere(sd2):
    ours, ref, plain = _both(
        sd2,
        "a red car and a blue bench",
        [3, 7],
        ["car", "bench"],
        steps=16,
        thresholds={0: 0.9},
        max_iter_to_alter=8,
        ctl_kwargs={"exclude_eot": False},
        plain=True,
    )
    assert (ref - plain).abs().max() > 1e-2
    assert (ours.images - ref).abs().max() < 1e-4
