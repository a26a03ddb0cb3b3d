import warnings

import numpy as np
import pytest
import torch

import attncontrol
from attncontrol import AttendExcite, ResolutionError, SubjectNotInPromptError, UnsupportedPipelineError
from attncontrol.controls.base import Control, Evaluation, PreparedControl, StepPlan
from attncontrol.testing import make_scheduler

from .conftest import diffusers_max_attention, processor_snapshot, seeded

AE = dict(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=5)


def _run(pipe, controls, steps=8, seed=0, **kw):
    return attncontrol.generate(
        pipe, kw.pop("prompt", "a cat and a dog"), controls, num_inference_steps=steps, generator=seeded(seed), **kw
    )


def test_returns_what_the_pipeline_returns_and_a_trace(sd1):
    out = _run(sd1, [AttendExcite(**AE)], output_type="pil")
    assert len(out.images) == 1 and out.images[0].size == (64, 64)
    assert [r.index for r in out.trace] == list(range(8))
    guided = out.guided_steps
    assert [r.index for r in guided] == [0, 1, 2, 3, 4]
    for r in guided:
        assert 0 < r.loss[0] <= 1 and r.refinement_iterations == [0] and r.updated == [True]
        assert r.timestep == float(sd1.scheduler.timesteps[r.index]) and r.guidance_seconds > 0
    assert all(r.seconds > 0 for r in out.trace)
    arr = _run(sd1, [AttendExcite(**AE)], output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(arr[0], np.asarray(out.images[0]) / 255.0, atol=1 / 255 + 1e-6)


@pytest.mark.slow
def test_same_seed_same_image_and_control_changes_it(sd1):
    a = _run(sd1, [AttendExcite(**AE)], output_type="latent").images
    b = _run(sd1, [AttendExcite(**AE)], output_type="latent").images
    c = _run(sd1, [AttendExcite(**AE)], output_type="latent", seed=1).images
    plain = _run(sd1, [], output_type="latent").images
    ref_plain = sd1("a cat and a dog", num_inference_steps=8, generator=seeded(0), output_type="latent").images
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    assert (a - plain).abs().max() > 1e-2
    torch.testing.assert_close(plain, ref_plain)  # no control: exactly the stock pipeline


def test_refinement_lowers_the_loss(sd1):
    # the random tiny model's attention barely responds, hence the large step size
    out = _run(
        sd1,
        [
            AttendExcite(
                subjects=["cat", "dog"],
                thresholds={0: 0.5},
                max_iter_to_alter=1,
                max_refinement_steps=10,
                scale_factor=400,
            )
        ],
        steps=4,
        output_type="latent",
    )
    step0 = out.trace[0]
    assert step0.refinement_iterations == [10]
    assert step0.loss[0] < step0.initial_loss[0] - 1e-3


def test_guidance_step_raises_the_weakest_subjects_attention(sd1):
    """The quantity A&E maximises, measured by diffusers' own A&E code (not by the engine), is higher after a
    guided step than before, at the same timestep."""
    run = attncontrol.prepare_run(
        sd1,
        "a cat and a dog",
        [AttendExcite(subjects=["cat", "dog"], thresholds={})],
        num_inference_steps=10,
        guidance_scale=1.0,
    )
    z = torch.randn(1, 4, 32, 32, generator=seeded(3))
    with run.installed():
        z2, record = run.guide(z, 0)
    t = sd1.scheduler.timesteps[0]
    before = min(diffusers_max_attention(sd1, z, t, "a cat and a dog", [2, 5]))
    after = min(diffusers_max_attention(sd1, z2, t, "a cat and a dog", [2, 5]))
    assert record.updated == [True] and not torch.equal(z, z2)
    assert after > before
    assert record.initial_loss[0] == pytest.approx(1 - before, abs=1e-5)  # and the engine saw the same peak


@pytest.mark.slow
def test_batched_images_each_get_their_own_refinement(sd1):
    """Four images whose weakest subject starts at different strengths (threshold 0.0164 sits between them on
    the tiny model): each refines until its own loss passes, so the counts differ, and each image's count and
    latents are what that image gets when it is generated alone."""
    prompts, subjects = ["a cat and a dog", "a bird and a bear"], [["cat", "dog"], ["bird", "bear"]]
    z = torch.randn(4, 4, 32, 32, generator=seeded(0))

    def control(subs):
        return AttendExcite(
            subjects=subs, thresholds={0: 0.0164}, max_iter_to_alter=2, max_refinement_steps=8, scale_factor=400
        )

    out = _run(
        sd1, [control(subjects)], prompt=prompts, num_images_per_prompt=2, steps=4, latents=z, output_type="latent"
    )
    counts = out.trace[0].refinement_iterations
    assert len(set(counts)) >= 3 and 0 in counts and max(counts) < 8  # different, and not all at the cap
    for b in range(4):
        alone = _run(
            sd1,
            [control(subjects[b // 2])],
            prompt=prompts[b // 2],
            steps=4,
            latents=z[b : b + 1],
            output_type="latent",
        )
        assert alone.trace[0].refinement_iterations == [counts[b]]
        torch.testing.assert_close(alone.images[0], out.images[b], rtol=0, atol=1e-3)


def test_no_gradient_pass_after_the_last_altered_step(sd1):
    passes = []
    hook = sd1.unet.conv_in.register_forward_hook(lambda m, i, o: passes.append(torch.is_grad_enabled()))
    try:
        _run(
            sd1,
            [AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=3)],
            steps=8,
            output_type="latent",
        )
    finally:
        hook.remove()
    assert passes.count(True) == 3  # one guidance forward per altered step, none after
    assert passes.count(False) == 8  # the pipeline's own denoising forwards


def test_users_callback_still_called_and_its_changes_kept(sd1):
    seen = []

    def cb(pipe, i, t, kwargs):
        seen.append((i, kwargs["latents"].shape, tuple(kwargs)))
        return {"latents": kwargs["latents"] * 0.5} if i == 6 else kwargs

    out = _run(
        sd1,
        [AttendExcite(**AE)],
        output_type="latent",
        callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    assert [s[0] for s in seen] == list(range(8))
    assert seen[0][2] == ("latents", "prompt_embeds")
    plain = _run(sd1, [AttendExcite(**AE)], output_type="latent")
    assert (out.images - plain.images).abs().max() > 1e-3


def _procs_and_grads(pipe):
    return processor_snapshot(pipe.unet), [p.requires_grad for p in pipe.unet.parameters()]


def test_pipeline_restored_after_success_and_after_an_error(sd1):
    before = _procs_and_grads(sd1)
    seen_grad_flags = []

    def check(pipe, i, t, kwargs):
        seen_grad_flags.append(any(p.requires_grad for p in pipe.unet.parameters()))
        return kwargs

    _run(sd1, [AttendExcite(**AE)], output_type="latent", callback_on_step_end=check)
    assert seen_grad_flags and not any(seen_grad_flags)  # parameters frozen during the run
    assert _procs_and_grads(sd1) == before

    def boom(pipe, i, t, kwargs):
        if i == 3:
            raise RuntimeError("boom at step 3")
        return kwargs

    with pytest.raises(RuntimeError, match="boom"):
        _run(sd1, [AttendExcite(**AE)], output_type="latent", callback_on_step_end=boom)
    assert _procs_and_grads(sd1) == before


@pytest.mark.parametrize("scheduler", ["euler", "dpm"])
def test_other_schedulers(sd1, scheduler):
    sd1.scheduler = make_scheduler(scheduler)
    out = _run(sd1, [AttendExcite(**AE)], output_type="latent")
    plain = _run(sd1, [], output_type="latent")
    assert torch.isfinite(out.images).all()
    assert (out.images - plain.images).abs().max() > 1e-4  # the tiny model responds weakly under Euler
    ref_plain = sd1("a cat and a dog", num_inference_steps=8, generator=seeded(0), output_type="latent").images
    torch.testing.assert_close(plain.images, ref_plain)


def test_euler_guidance_sees_scaled_inputs(sd1):
    """Euler's scale_model_input divides by sqrt(sigma^2 + 1): the guidance forward must see that input."""
    sd1.scheduler = make_scheduler("euler")
    seen = []
    hook = sd1.unet.conv_in.register_forward_hook(
        lambda m, i, o: seen.append(i[0].detach().std().item()) if torch.is_grad_enabled() else None
    )
    try:
        _run(sd1, [AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=1)], output_type="latent")
    finally:
        hook.remove()
    # initial noise has std ~ init_noise_sigma; scaled, it is ~1
    assert len(seen) == 1 and 0.8 < seen[0] < 1.2


class _Recorder(AttendExcite):
    """A&E that records the dtype of every map its loss is given."""

    def prepare(self, ctx):
        prepared = super().prepare(ctx)
        evaluate, seen = prepared.evaluate, self.seen

        def recording(maps, images, step, carry):
            seen.extend(m.dtype for m in maps.values())
            return evaluate(maps, images, step, carry)

        prepared.evaluate = recording
        return prepared


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.slow
def test_half_precision_runs_with_float32_maps(sd1, dtype):
    sd1.to(dtype)
    control = _Recorder(**AE)
    control.seen = []
    out = _run(sd1, [control], output_type="latent")
    assert out.images.dtype == dtype and torch.isfinite(out.images.float()).all()
    assert all(np.isfinite(r.loss[0]) for r in out.guided_steps)
    assert control.seen and set(control.seen) == {torch.float32}  # the maps the loss reads, in every pass


class _NaNControl(Control):
    def prepare(self, ctx):
        return _PreparedNaN()


class _PreparedNaN(PreparedControl):
    name = "nan"
    resolution = (16, 16)

    def plan(self, step):
        return StepPlan(update=step < 2, step_size=1.0)

    def evaluate(self, maps, images, step, carry):
        (m,) = maps.values()
        return Evaluation((m.flatten(1).sum(1) * float("nan")).float())


def test_non_finite_gradient_skips_the_update_with_a_warning(sd1):
    with pytest.warns(UserWarning, match="non-finite gradient at step 0"):
        out = _run(sd1, [_NaNControl()], output_type="latent")
    plain = _run(sd1, [], output_type="latent")
    assert out.trace[0].updated == [False]
    torch.testing.assert_close(out.images, plain.images)


def test_bad_inputs_fail_before_any_work_and_leave_the_pipeline_alone(sd1):
    before = _procs_and_grads(sd1)
    calls = []
    hook = sd1.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(SubjectNotInPromptError, match="'horse'"):
            _run(sd1, [AttendExcite(subjects=["cat", "horse"])])
        with pytest.raises(ResolutionError, match="height must be a positive multiple of 8.*got 63"):
            _run(sd1, [AttendExcite(**AE)], height=63)
        with pytest.raises(ResolutionError, match=r"attn_res 8x8 .*has: 16x16"):
            _run(sd1, [AttendExcite(subjects=["cat"], attn_res=8)])
        with pytest.raises(TypeError, match="AttendExcite"):
            _run(sd1, ["cat"])
        with pytest.raises(TypeError, match="prompt_embeds"):
            _run(sd1, [], prompt_embeds=torch.zeros(1, 77, 32))
        with pytest.raises(ValueError, match="num_images_per_prompt"):
            _run(sd1, [], num_images_per_prompt=0)
    finally:
        hook.remove()
    assert not calls
    assert _procs_and_grads(sd1) == before


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"subjects": []}, "at least one subject"),
        ({"subjects": ["cat"], "scale_factor": 0}, "scale_factor must be > 0, got 0"),
        ({"subjects": ["cat"], "max_iter_to_alter": -1}, r"stop \(max_iter_to_alter\) must be >= 0, got -1"),
        ({"subjects": ["cat"], "thresholds": {0: 1.5}}, "between 0 and 1, got 1.5"),
        ({"subjects": ["cat"], "thresholds": {-2: 0.5}}, "got -2"),
        ({"subjects": ["cat"], "kernel_size": 4}, "odd integer, got 4"),
        ({"subjects": ["cat"], "sigma": 0}, "sigma must be > 0, got 0"),
        ({"subjects": ["cat"], "attn_res": (0, 16)}, r"got \(0, 16\)"),
        ({"subjects": ["cat"], "scale_range": (1.0, -0.5)}, "scale_range"),
    ],
)
def test_attend_excite_validates_its_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttendExcite(**kwargs)


def test_unsupported_pipeline_is_named(sd1):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(
        UnsupportedPipelineError, match="DDPMPipeline.*StableDiffusionXLPipeline.*StableDiffusionPipeline"
    ):
        attncontrol.generate(pipe, "a cat", [AttendExcite(subjects=["cat"])])


def test_non_square_images(sd1):
    out = _run(sd1, [AttendExcite(**AE)], height=48, width=80, output_type="latent")
    assert out.images.shape == (1, 4, 24, 40)
    assert out.guided_steps and all(np.isfinite(r.loss[0]) for r in out.guided_steps)


def test_sd2_family_defaults_to_prompt_tokens_only(sd2):
    """SD 2.x pads with "!": by default the softmax over tokens leaves EOT and padding out (official SD 2.1 rule);
    exclude_eot=False restores diffusers' rule, and the two give different guidance."""
    from attncontrol.models import get_adapter

    assert get_adapter(sd2).family == "sd2" and get_adapter(sd2).exclude_eot_default
    default = _run(
        sd2, [AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=3)], output_type="latent"
    )
    diffusers_rule = _run(
        sd2,
        [AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=3, exclude_eot=False)],
        output_type="latent",
    )
    # with 5 kept tokens instead of 75, each subject gets a far larger share: the loss is much lower
    assert default.trace[0].loss[0] < diffusers_rule.trace[0].loss[0] - 0.1
    assert (default.images - diffusers_rule.images).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_negative_prompt_works_on_sd1_and_sd2_with_and_without_controls(family, request):
    """A str negative prompt beside our list of prompts: SD's encode_prompt refuses mixed types (issue #31)."""
    pipe = request.getfixturevalue(family)
    kw = dict(num_inference_steps=2, output_type="latent")
    stock = pipe("a cat and a dog", negative_prompt="blurry", generator=seeded(0), **kw).images
    plain = attncontrol.generate(pipe, "a cat and a dog", [], negative_prompt="blurry", generator=seeded(0), **kw)
    assert torch.equal(plain.images, stock)
    without = pipe("a cat and a dog", generator=seeded(0), **kw).images
    assert not torch.equal(stock, without)  # the negative prompt is used
    ae = attncontrol.AttendExcite(subjects=["cat", "dog"], thresholds={})
    guided = attncontrol.generate(pipe, "a cat and a dog", [ae], negative_prompt="blurry", generator=seeded(0), **kw)
    assert guided.images.shape == stock.shape and torch.isfinite(guided.images).all()


def test_attend_excite_does_nothing_before_its_window_not_even_refinement(sd1):
    """start=1 on a 2-step run with a threshold at step 0: A&E must not act at step 0, not even refine (issue #31);
    a window wholly past the schedule (start=10 of 2 steps) is refused, as a method that never acts (#26)."""
    from attncontrol import OptionError

    kw = dict(num_inference_steps=2, output_type="latent")
    late = attncontrol.AttendExcite(subjects=["cat", "dog"], start=1, stop=2, thresholds={0: 0.99})
    out = attncontrol.generate(sd1, "a cat and a dog", [late], generator=seeded(0), **kw)
    assert out.trace[0].loss is None and not out.trace[0].refinement_iterations
    assert out.trace[1].loss is not None
    never = attncontrol.AttendExcite(subjects=["cat", "dog"], start=10, stop=20)
    with pytest.raises(OptionError, match="start is step 10 .* this schedule has 2 steps"):
        attncontrol.generate(sd1, "a cat and a dog", [never], generator=seeded(0), **kw)
    inside = attncontrol.AttendExcite(subjects=["cat", "dog"], start=0, stop=1, thresholds={0: 0.99})
    plain = attncontrol.generate(sd1, "a cat and a dog", [], generator=seeded(0), **kw).images
    acted = attncontrol.generate(sd1, "a cat and a dog", [inside], generator=seeded(0), **kw)
    assert acted.trace[0].refinement_iterations[0] > 0 and not torch.equal(acted.images, plain)


def test_a_run_whose_latents_turn_nan_fails_and_restores_the_pipeline(sd1):
    """scale_factor=1e30 sends the latents to inf/NaN: an error naming the step, not a black image (issue #31)."""
    from attncontrol import NonFiniteError, OptionError

    before = processor_snapshot(sd1.unet)
    grads = [p.requires_grad for p in sd1.unet.parameters()]
    huge = attncontrol.AttendExcite(subjects=["cat", "dog"], scale_factor=1e30, thresholds={})
    with pytest.raises(NonFiniteError, match="not finite after"):
        attncontrol.generate(
            sd1, "a cat and a dog", [huge], num_inference_steps=3, generator=seeded(0), output_type="latent"
        )
    assert processor_snapshot(sd1.unet) == before
    assert [p.requires_grad for p in sd1.unet.parameters()] == grads
    nan = torch.full((1, 4, 32, 32), float("nan"))
    with pytest.raises(OptionError, match="latents hold NaN"):
        attncontrol.generate(sd1, "a cat and a dog", [], num_inference_steps=2, latents=nan, output_type="latent")
