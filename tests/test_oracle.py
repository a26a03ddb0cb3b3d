"""Our Attend-and-Excite equals diffusers' StableDiffusionAttendAndExcitePipeline (the oracle) on the same
tiny model, seed and settings. In float64 the two agree to rounding (~1e-13): any difference in the method
(maps, softmax, smoothing, step sizes, refinement, thresholds) would show up far above 1e-9. In float32 the
method's own dynamics amplify rounding (a 1e-7 change of the initial noise moves the reference's output by
~5e-5), so there the bar is the issue's 1e-4, against an effect of the method that is >1e-2.

The float64 cases run on UNets 4x narrower than the other tests' (8/16 channels: ``NARROW``): float64 convolutions
are slow on a CPU, and the comparison needs no width. On them refinement still runs to its cap of 20 where the
thresholds are out of reach, and the method still moves the latents by ~1 (the effect is asserted per case)."""

import pytest
import torch

import attncontrol
from attncontrol.testing import make_scheduler, make_tiny_sd_pipeline

from .conftest import ae_reference, seeded

REFINE_20 = {0: 0.05, 5: 0.5, 10: 0.8}
NARROW = {"block_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": (1, 2)}


def narrow(family: str = "sd1", seed: int = 0, scheduler: str = "ddim"):
    """A float64 tiny pipeline of ``family`` with the narrow UNet (module docstring)."""
    pipe = make_tiny_sd_pipeline(family, seed=seed, scheduler=scheduler, unet_overrides=NARROW).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
@pytest.mark.slow
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
@pytest.mark.slow
def test_float64_equals_diffusers_to_rounding(scheduler):
    pipe = narrow(scheduler=scheduler)
    ours, ref, plain = _both(
        pipe, "a cat and a dog", [2, 5], ["cat", "dog"], thresholds=REFINE_20, max_iter_to_alter=10, plain=True
    )
    assert (ref - plain).abs().max() > 1e-2
    assert (ours.images - ref).abs().max() < 1e-9
    assert sum(ours.trace[i].refinement_iterations[0] for i in REFINE_20) > 0  # refinement was exercised


@pytest.mark.slow
def test_float64_sd2_family_other_prompt_and_settings():
    sd2 = narrow("sd2", seed=1)
    # upcast_attention computes attention scores in float32 even in a float64 model, which would put float32
    # rounding back in; it is switched off here and exercised by the float32 SD2 test below.
    for module in sd2.unet.modules():
        if hasattr(module, "upcast_attention"):
            module.upcast_attention = False
    sd2.scheduler = make_scheduler("pndm")
    ours, ref, plain = _both(
        sd2,
        "a red car and a blue bench",
        [3, 7],
        ["car", "bench"],
        steps=16,
        thresholds={0: 0.9, 3: 0.6},
        max_iter_to_alter=8,
        scale_factor=10,
        ctl_kwargs={"exclude_eot": False},
        plain=True,
    )
    assert (ref - plain).abs().max() > 1e-2
    assert (ours.images - ref).abs().max() < 1e-9


@pytest.mark.slow
def test_float64_prompt_list_and_several_images_per_prompt():
    """Guidance is batched over 4 images; each still gets its own refinement decision, as in the per-image loop."""
    prompts = ["a cat and a dog", "a frog with a crown"]
    ours, ref, plain = _both(
        narrow(),
        prompts,
        [[2, 5], [2, 5]],
        [["cat", "dog"], ["frog", "crown"]],
        steps=12,
        thresholds={0: 0.3, 4: 0.5},
        max_iter_to_alter=6,
        num_images_per_prompt=2,
        plain=True,
    )
    assert ours.images.shape[0] == 4
    assert ((ref - plain).abs().flatten(1).amax(1) > 1e-2).all()  # each of the 4 images is moved by the method
    assert (ours.images - ref).abs().max() < 1e-9
    assert len(ours.trace[0].loss) == 4


@pytest.mark.slow
def test_float64_non_default_schedule():
    ours, ref, plain = _both(
        narrow(),
        "a bird and a bear",
        [2, 5],
        ["bird", "bear"],
        steps=10,
        thresholds={0: 0.95, 2: 0.9},
        max_iter_to_alter=4,
        scale_factor=35,
        plain=True,
    )
    assert (ref - plain).abs().max() > 1e-2
    assert (ours.images - ref).abs().max() < 1e-9
    assert ours.trace[0].refinement_iterations == [20]  # 0.95 is out of reach: the reference's cap of 20


@pytest.mark.slow
@pytest.mark.slow
def test_float64_refinement_that_stops_at_its_threshold():
    """On random weights a subject's peak stays near 0.017, so the usual thresholds run refinement to its cap.
    Here step 0's threshold (0.0169) is reached after a few iterations: the stopping test itself (loss > 1 - T)
    is compared, not only the cap (a target moved by 1e-4 fails here)."""
    ours, ref, plain = _both(
        narrow(),
        "a cat and a dog",
        [2, 5],
        ["cat", "dog"],
        steps=8,
        thresholds={0: 0.0169, 3: 0.0181},
        max_iter_to_alter=6,
        plain=True,
    )
    assert 0 < ours.trace[0].refinement_iterations[0] < 20
    assert (ref - plain).abs().max() > 1e-2
    assert (ours.images - ref).abs().max() < 1e-9


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


# ---------------------------------------------------------------- paths the first oracle cases did not cover
# A tiny SD1 pipeline of another seed than the fixtures', an 8-token prompt, the reference's default thresholds
# and caps at 50 steps (refinement runs its full 20 iterations at steps 0, 10 and 20 on these random weights),
# PNDM (51 timesteps for 50 steps), custom thresholds with 2 images per prompt, and no refinement at 40 steps.
# The reference gets the token indices read from the tokenizer here, not from our resolution.

BIRD_CAR = "a red bird and a blue car"


def _bird_car_indices(pipe) -> list[int]:
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(BIRD_CAR).input_ids)
    return [tokens.index("bird</w>"), tokens.index("car</w>")]


def _unseen_case(dtype, scheduler, steps, num_images=1, **ae):
    if dtype == torch.float64:
        pipe = narrow(seed=11, scheduler=scheduler)
    else:
        pipe = make_tiny_sd_pipeline("sd1", seed=11, sample_size=32, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
    kw = dict(
        num_inference_steps=steps,
        guidance_scale=7.5,
        output_type="latent",
        height=64,
        width=64,
        num_images_per_prompt=num_images,
    )
    ref = ae_reference(pipe)(
        BIRD_CAR, token_indices=_bird_car_indices(pipe), generator=seeded(5), attn_res=(16, 16), **ae, **kw
    ).images
    control = attncontrol.AttendExcite(subjects=["bird", "car"], attn_res=16, **ae)
    ours = attncontrol.generate(pipe, BIRD_CAR, [control], generator=seeded(5), **kw)
    return pipe, ours, ref, kw


def test_the_bird_car_indices_are_bird_and_car_not_blue():
    """The prompt has 8 tokens: "blue" sits at 6, "car" at 7. A check that gives the reference [3, 6] measures A&E
    on "bird" and "blue" against ours on "bird" and "car" (a 1e-2 difference, in float64 too)."""
    from attncontrol.testing import make_clip_tokenizer

    tokens = make_clip_tokenizer().convert_ids_to_tokens(make_clip_tokenizer()(BIRD_CAR).input_ids)
    assert tokens[3] == "bird</w>" and tokens[6] == "blue</w>" and tokens[7] == "car</w>"


@pytest.mark.slow
def test_float64_pndm_50_steps_default_thresholds_full_refinement():
    pipe, ours, ref, kw = _unseen_case(torch.float64, "pndm", 50)
    assert (ref - pipe(BIRD_CAR, generator=seeded(5), **kw).images).abs().max() > 1e-2
    assert len(ours.trace) == 51  # PNDM's 51 timesteps: the step sizes are spread over all of them, as diffusers'
    assert [ours.trace[i].refinement_iterations for i in (0, 10, 20)] == [[20], [20], [20]]
    assert (ours.images - ref).abs().max() < 1e-9


@pytest.mark.slow
def test_float64_ddim_custom_thresholds_two_images_per_prompt():
    pipe, ours, ref, kw = _unseen_case(
        torch.float64, "ddim", 30, num_images=2, thresholds={0: 0.05, 6: 0.5}, max_iter_to_alter=12, scale_factor=15
    )
    assert (ref - pipe(BIRD_CAR, generator=seeded(5), **kw).images).abs().max() > 1e-2
    assert ours.images.shape[0] == 2
    assert ours.trace[6].refinement_iterations == [20, 20]
    assert (ours.images - ref).abs().max() < 1e-9


@pytest.mark.slow
def test_float32_ddim_no_refinement_40_steps():
    pipe, ours, ref, kw = _unseen_case(torch.float32, "ddim", 40, thresholds={})
    plain = pipe(BIRD_CAR, generator=seeded(5), **kw).images
    assert (ref - plain).abs().max() > 1e-2
    assert all(not any(r.refinement_iterations or [0]) for r in ours.trace)
    assert (ours.images - ref).abs().max() < 1e-4
