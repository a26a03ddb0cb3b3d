"""The guidance update acts in the model's input space, so it does not depend on the scheduler's latent scaling.

Euler-type schedulers (Euler, LMS, Heun, KDPM2, ...) keep latents x with std sqrt(sigma^2 + 1) and feed the
denoiser ``scale_model_input(x, t) = x / sqrt(sigma^2 + 1)``; DDIM/PNDM/DPM-Solver keep the model input itself.
A step taken on x with x's own gradient would move the model input by 1/(sigma^2 + 1) of the intended step
(~200x weaker at SDXL's first sigma). We step in the model input z and map back.
"""

import math

import pytest
import torch

import attncontrol
from attncontrol import AStar, AttendExcite, Refocus
from attncontrol.testing import make_scheduler

from .conftest import seeded

PROMPT = "a cat and a dog"
BOXES = {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}


def _euler_like_ddim():
    from diffusers import EulerDiscreteScheduler

    # the same timesteps as make_scheduler("ddim") (leading spacing, offset 1), so both see the same t
    return EulerDiscreteScheduler.from_config(make_scheduler("euler").config, timestep_spacing="leading")


def _guided(pipe, control, z_model: torch.Tensor, step: int, steps: int = 10) -> tuple[torch.Tensor, object]:
    """Guide the model input ``z_model`` at ``step`` with ``pipe``'s scheduler; return the guided model input."""
    run = attncontrol.prepare_run(pipe, PROMPT, [control], num_inference_steps=steps, guidance_scale=1.0)
    sched = pipe.scheduler
    sched._step_index = step  # where the sampling loop would be at this step
    scale = float(sched.scale_model_input(torch.ones((), dtype=torch.float64), sched.timesteps[step]))
    x = z_model / scale  # the scheduler's own latents for this model input
    with run.installed():
        x_guided, record = run.guide(x, step)
    return x_guided * scale, record


@pytest.mark.parametrize(
    "control",
    [
        AttendExcite(subjects=["cat", "dog"], thresholds={0: 0.9, 3: 0.9}, max_refinement_steps=3, scale_factor=200),
        AStar(subjects=["cat", "dog"], scale_factor=200),
        Refocus(boxes=BOXES),
    ],
    ids=["attend-excite", "astar", "refocus"],
)
@pytest.mark.parametrize("step", [0, 3])
def test_same_model_input_gets_the_same_update_whatever_the_scheduler(sd1, control, step):
    sd1.to(torch.float64)
    z = torch.randn(1, 4, 32, 32, generator=seeded(5), dtype=torch.float64)

    sd1.scheduler = make_scheduler("ddim")
    sd1.scheduler.set_timesteps(10)
    ddim_z, ddim_record = _guided(sd1, control, z.clone(), step)

    sd1.scheduler = _euler_like_ddim()
    sd1.scheduler.set_timesteps(10)
    assert torch.equal(sd1.scheduler.timesteps.long(), _ddim_ts(10))
    sigma = float(sd1.scheduler.sigmas[step])
    assert sigma > 1.5  # a real Euler scaling, not the identity
    euler_z, euler_record = _guided(sd1, control, z.clone(), step)

    assert (ddim_z - z).abs().max() > 1e-4  # the control moved the input
    assert euler_record.refinement_iterations == ddim_record.refinement_iterations
    torch.testing.assert_close(euler_z, ddim_z, rtol=0, atol=1e-9)


def _ddim_ts(n):
    s = make_scheduler("ddim")
    s.set_timesteps(n)
    return s.timesteps.long()


def test_step_zero_guides_the_model_input(sd1):
    """Step 0 of a run: the initial noise times init_noise_sigma is the Euler latent. The pipeline's first
    denoising forward must see the same guided model input as on DDIM (where init_noise_sigma is 1)."""
    sd1.to(torch.float64)
    noise = torch.randn(1, 4, 32, 32, generator=seeded(1), dtype=torch.float64)
    control = AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=1, scale_factor=200)
    inputs = {}
    for name, sched in (("ddim", make_scheduler("ddim")), ("euler", _euler_like_ddim())):
        sd1.scheduler = sched
        seen = []

        def grab(module, args, seen=seen):
            seen.append((torch.is_grad_enabled(), args[0].detach().clone()))

        hook = sd1.unet.conv_in.register_forward_pre_hook(grab)
        try:
            attncontrol.generate(
                sd1,
                PROMPT,
                [control],
                num_inference_steps=10,
                latents=noise.clone(),
                guidance_scale=1.0,
                output_type="latent",
                callback_on_step_end=_stop_after_first,
            )
        finally:
            hook.remove()
        assert [grad for grad, _ in seen] == [True, False]  # step 0's guidance pass, then its denoising forward
        inputs[name] = (seen[0][1], seen[1][1])
    torch.testing.assert_close(inputs["euler"][0], inputs["ddim"][0], rtol=0, atol=1e-12)  # same input to guide
    assert (inputs["ddim"][1] - inputs["ddim"][0]).abs().max() > 1e-4  # the guidance moved it
    torch.testing.assert_close(inputs["euler"][1], inputs["ddim"][1], rtol=0, atol=1e-9)  # and by the same step


def _stop_after_first(pipe, i, t, kwargs):
    pipe._interrupt = True
    return kwargs


@pytest.mark.parametrize(
    "control",
    [
        AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=3),
        AStar(subjects=["cat", "dog"], max_iter_to_alter=3),
        Refocus(boxes=BOXES),
    ],
    ids=["attend-excite", "astar", "refocus"],
)
@pytest.mark.slow
def test_sdxl_euler_moves_the_image_as_much_as_ddim(sdxl, control):
    """On the tiny SDXL pipeline, each control's effect on the image with the stock Euler scheduler is of the
    same order as with DDIM (before the fix it was 1/(sigma^2+1) of it at the first steps: ~1e-2 to 1e-4)."""
    effects = {}
    for name in ("ddim", "euler"):  # "euler": the stock SDXL scheduler settings
        sdxl.scheduler = make_scheduler(name)
        kw = dict(num_inference_steps=6, output_type="latent")
        plain = attncontrol.generate(sdxl, PROMPT, [], generator=seeded(0), **kw).images
        guided = attncontrol.generate(sdxl, PROMPT, [control], generator=seeded(0), **kw).images
        # both schedulers end at sigma 0, where latents and model input are the same space
        effects[name] = float((guided - plain).abs().max())
    ratio = effects["euler"] / effects["ddim"]
    assert effects["ddim"] > 1e-4
    assert 1 / 5 < ratio < 5, effects


def test_input_scale_of_the_stock_schedulers(sd1):
    """The adapter's model-input scale: 1 for DDIM/PNDM/DPM-Solver, 1/sqrt(sigma^2+1) for Euler."""
    from attncontrol.models import get_adapter

    for name in ("ddim", "pndm", "dpm"):
        sd1.scheduler = make_scheduler(name)
        sd1.scheduler.set_timesteps(10)
        assert get_adapter(sd1).input_scale(sd1.scheduler.timesteps[0]) == 1.0
    sd1.scheduler = make_scheduler("euler")
    sd1.scheduler.set_timesteps(10)
    sigma = float(sd1.scheduler.sigmas[0])
    scale = get_adapter(sd1).input_scale(sd1.scheduler.timesteps[0])
    assert scale == pytest.approx(1 / math.sqrt(sigma**2 + 1), rel=1e-6)
