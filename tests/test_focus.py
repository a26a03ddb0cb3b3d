"""Attend-and-Excite on SD3 equals an independent float64 reference of FOCUS's semantics (ericbill21/FOCUS,
``src/sd3``: image->text part of the full joint softmax, mean over heads then blocks, 3x3 Gaussian blur with sigma
1 (torchvision's kernel, reflect padding), renormalised over the subjects' tokens, a subject's CLIP and T5 tokens
averaged, ``relu(1 - min_k max_pixels)``, and the velocity correction
``v <- v + lambda * 2(s+1e-3)/(1-s+1e-3) * s * grad``, s = t/1000, at every step).

The reference below is written from those semantics alone: explicit softmaxes over all keys from hooks on the
attention modules, its own blur, its own loss, CFG velocity from the transformer, the stock scheduler step.
Ours runs through ``generate`` with ``AttendExcite(recipe="focus", update="velocity")``."""

import math

import pytest
import torch
import torch.nn.functional as F

import attncontrol
from attncontrol.processors.joint import JOINT

from .conftest import seeded

PROMPT = "a cat and a dog"
STEPS, LAMBDA, CFG, MAX_LEN = 3, 4.0, 4.5, 16


def _blur(maps: torch.Tensor) -> torch.Tensor:
    """(r, g, g) -> separable 3x3 Gaussian, sigma 1 (torchvision's kernel), reflect padding (no edge repeat)."""
    w = torch.tensor([math.exp(-0.5), 1.0, math.exp(-0.5)], dtype=maps.dtype)
    w = w / w.sum()
    x = F.pad(maps[:, None], (1, 1, 1, 1), mode="reflect")
    return F.conv2d(x, (w[:, None] * w[None, :])[None, None])[:, 0]


def _positions(pipe, word: str) -> list[int]:
    """The subject's rows: its CLIP positions (start token at 0) and its T5 positions + 77."""
    clip = pipe.tokenizer(PROMPT).input_ids
    t5 = pipe.tokenizer_3(PROMPT).input_ids
    (c,) = [i for i, t in enumerate(clip) if t == pipe.tokenizer(word, add_special_tokens=False).input_ids[0]]
    t5_ids = pipe.tokenizer_3(word, add_special_tokens=False).input_ids
    f = [i for i in range(len(t5)) if t5[i : i + len(t5_ids)] == t5_ids][0]
    return [c, *(77 + f + j for j in range(len(t5_ids)))]


def _reference(pipe, noise: torch.Tensor) -> torch.Tensor:
    transformer, sched = pipe.transformer, pipe.scheduler
    with torch.no_grad():  # the pipeline encodes without autograd too
        pe, npe, ppe, nppe = pipe.encode_prompt(
            PROMPT, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=MAX_LEN
        )
    subjects = [_positions(pipe, "cat"), _positions(pipe, "dog")]
    rows = [p for s in subjects for p in s]
    sched.set_timesteps(STEPS)
    x = noise.clone()
    n_img = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    for t in sched.timesteps:
        captured = []

        def hook(module, args, kwargs, captured=captured):
            hidden = args[0] if args else kwargs["hidden_states"]
            q, k, _ = JOINT.query_key(module, {"hidden_states": hidden, **kwargs})
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # over all N + M keys
            captured.append(p[0, :, :n_img, n_img:].mean(0))  # heads averaged: (N, M)

        handles = [b.attn.register_forward_pre_hook(hook, with_kwargs=True) for b in transformer.transformer_blocks]
        leaf = x.clone().requires_grad_(True)
        try:
            transformer(hidden_states=leaf, timestep=t.expand(1), encoder_hidden_states=pe, pooled_projections=ppe)
        finally:
            for h in handles:
                h.remove()
        e = torch.stack(captured).mean(0)[:, rows].T  # blocks averaged, the subjects' rows: (|R|, N)
        g = int(math.isqrt(n_img))
        blurred = _blur(e.reshape(len(rows), g, g)).reshape(len(rows), -1)
        shares = blurred / blurred.sum(0, keepdim=True)
        peaks, start = [], 0
        for s in subjects:
            peaks.append(shares[start : start + len(s)].mean(0).max())
            start += len(s)
        loss = torch.relu(1 - torch.stack(peaks).min())
        (grad,) = torch.autograd.grad(loss, [leaf])
        with torch.no_grad():
            v_u, v_c = transformer(
                hidden_states=torch.cat([x, x]),
                timestep=t.expand(2),
                encoder_hidden_states=torch.cat([npe, pe]),
                pooled_projections=torch.cat([nppe, ppe]),
            ).sample.chunk(2)
            v = v_u + CFG * (v_c - v_u)
            s = float(t) / 1000
            coef = 2 * (s + 1e-3) / (1 - s + 1e-3) * s
            x = sched.step(v + LAMBDA * coef * grad, t, x).prev_sample
    return x


@pytest.mark.parametrize("dual", [False, True], ids=["sd3", "sd35"])
@pytest.mark.slow
def test_attend_and_excite_on_sd3_equals_the_focus_reference(dual, request):
    pipe = request.getfixturevalue("sd35" if dual else "sd3").to(torch.float64)
    noise = torch.randn(1, 16, 16, 16, generator=seeded(7), dtype=torch.float64)
    control = attncontrol.AttendExcite(
        subjects=["cat", "dog"], recipe="focus", update="velocity", velocity_scale=LAMBDA, stop=None
    )
    ours = attncontrol.generate(
        pipe,
        PROMPT,
        [control],
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        latents=noise.clone(),
        output_type="latent",
        max_sequence_length=MAX_LEN,
    )
    reference = _reference(pipe, noise)
    plain = attncontrol.generate(
        pipe,
        PROMPT,
        [],
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        latents=noise.clone(),
        output_type="latent",
        max_sequence_length=MAX_LEN,
    ).images
    assert (reference - plain).abs().max() > 1e-2  # the method moves the image
    assert len(ours.guided_steps) == STEPS
    torch.testing.assert_close(ours.images, reference, rtol=0, atol=1e-6)
