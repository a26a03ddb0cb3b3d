"""Gradient checkpointing of the guidance forward (``GuidanceEngine(..., checkpointing=True)``): same losses,
gradients and latents as without it, the recompute really happens, and nothing is left patched afterwards; and the
regional-prompting benchmark runs (its smallest case, no time asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attncontrol
from attncontrol import AStar, AttendExcite, Refocus
from attncontrol.guidance import GuidanceEngine
from attncontrol.models.unet import blocks_before, checkpoint_layers

from .conftest import processor_snapshot, seeded

PROMPT = "a cat and a dog"


def _run(pipe, controls, checkpointing, n_images=1):
    return attncontrol.prepare_run(
        pipe,
        PROMPT,
        controls,
        num_inference_steps=10,
        guidance_scale=1.0,
        num_images_per_prompt=n_images,
        checkpointing=checkpointing,
    )


def _pass(pipe, controls, checkpointing, latents):
    """One guidance pass: (objective, losses, gradient w.r.t. the latents, maps after the backward)."""
    run = _run(pipe, controls, checkpointing, latents.shape[0])
    with run.installed(), torch.enable_grad():
        p = run.engine.evaluate(latents, 0)
        leaf, objective, losses = p.leaf, p.objective, p.losses
        maps_before = run.store.maps((16, 16)).detach().clone()
        (grad,) = torch.autograd.grad(objective.sum(), [leaf])
        maps_after = run.store.maps((16, 16)).detach().clone()
    return objective.detach(), {k: v.detach() for k, v in losses.items()}, grad, maps_before, maps_after


def _counting_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_checkpointed_pass_gives_the_same_loss_and_gradient(sd1):
    controls = [AttendExcite(subjects=["cat", "dog"]), AStar(subjects=["cat", "dog"])]
    latents = torch.randn(2, 4, 32, 32, generator=seeded(1))
    first = sd1.unet.down_blocks[0].resnets[0].conv1  # the recompute calls the resnet's forward, then this
    calls, handle = _counting_calls(first)
    try:
        plain = _pass(sd1, controls, False, latents)
        assert len(calls) == 1
        ckpt = _pass(sd1, controls, True, latents)
        assert len(calls) == 3  # forward, then recomputed in the backward: checkpointing really ran
    finally:
        handle.remove()
    objective, losses, grad, maps_before, maps_after = ckpt
    assert torch.allclose(objective, plain[0], rtol=1e-6, atol=0)
    for name in losses:
        assert torch.allclose(losses[name], plain[1][name], rtol=1e-6, atol=0)
    assert grad.abs().sum() > 0
    assert (grad - plain[2]).abs().max() <= 1e-6 * grad.abs().max()
    # the recompute in the backward left the store as the forward filled it
    assert torch.equal(maps_before, maps_after)
    assert torch.equal(maps_before, plain[3])


def test_checkpointed_layers_are_those_before_the_last_captured_block(sd1):
    unet = sd1.unet
    store = _run(sd1, [AttendExcite(subjects=["cat", "dog"])], True).store
    assert store.last_layer.startswith("up_blocks.0.")
    assert blocks_before(unet, store.last_layer) == [*unet.down_blocks, unet.mid_block]
    assert blocks_before(unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor") == [
        unet.down_blocks[0]
    ]
    with pytest.raises(ValueError):
        blocks_before(unet, "conv_in")
    layers = checkpoint_layers(unet, store.last_layer)
    assert unet.down_blocks[1].attentions[0] in layers and unet.down_blocks[0].downsamplers[0] in layers
    assert not any(m is unet.up_blocks[0] or any(m is x for x in unet.up_blocks[0].modules()) for m in layers)


def test_nothing_left_patched_after_a_checkpointed_step(sd1):
    unet = sd1.unet
    before = processor_snapshot(unet)
    flags = [p.requires_grad for p in unet.parameters()]
    run = _run(sd1, [AttendExcite(subjects=["cat", "dog"], thresholds={0: 0.99})], True)
    store = run.store
    with run.installed():
        z, record = run.guide(torch.randn(1, 4, 32, 32, generator=seeded(2)), 0)
    assert record.refinement_iterations[0] > 1 and record.updated == [True]
    assert processor_snapshot(unet) == before
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert not any("forward" in vars(m) for m in unet.modules())
    assert not store.active and store.early_exit and not store.replaying


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.slow
def test_generate_with_checkpointing_equals_without(family, request, monkeypatch):
    """Whole runs with refinement, several images and three latent controls: same latents and trace."""
    pipe = request.getfixturevalue(family)
    controls = [
        AttendExcite(subjects=["cat", "dog"], thresholds={0: 0.9, 2: 0.9}, max_refinement_steps=3, attn_res=16),
        AStar(subjects=["cat", "dog"], attn_res=16),
        Refocus(boxes={"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}, attn_res=16),
    ]

    def run():
        return attncontrol.generate(
            pipe,
            PROMPT,
            controls,
            num_inference_steps=4,
            num_images_per_prompt=2,
            generator=seeded(0),
            output_type="latent",
            height=64,
            width=64,
        )

    class Checkpointed(GuidanceEngine):  # forces the option, whatever generate() passes
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "checkpointing": True})

    calls, handle = _counting_calls(pipe.unet.down_blocks[0].resnets[0].conv1)
    try:
        plain = run()
        n_plain = len(calls)
        monkeypatch.setattr(attncontrol.run, "GuidanceEngine", Checkpointed)
        ckpt = run()
    finally:
        handle.remove()
    assert len(calls) - n_plain > n_plain  # every guidance pass recomputed that layer in its backward
    assert sum(sum(r.refinement_iterations or [0]) for r in plain.trace) > 0
    assert (ckpt.images - plain.images).abs().max() <= 1e-6 * plain.images.abs().max()
    for a, b in zip(plain.trace, ckpt.trace):
        assert a.refinement_iterations == b.refinement_iterations
        assert a.loss == pytest.approx(b.loss, rel=1e-6)


@pytest.mark.slow
def test_public_option_and_cli_flag(sd1, tiny_dirs, tmp_path):
    from attncontrol.cli import main

    controls = [AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=2)]

    def run(**kw):
        return attncontrol.generate(
            sd1, PROMPT, controls, num_inference_steps=3, generator=seeded(0), output_type="latent", **kw
        )

    calls, handle = _counting_calls(sd1.unet.down_blocks[0].resnets[0].conv1)
    try:
        plain = run()
        n_plain = len(calls)
        ckpt = run(checkpointing=True)
    finally:
        handle.remove()
    assert len(calls) - n_plain == n_plain + 2  # the same forwards plus one recompute per guidance pass (2)
    assert (ckpt.images - plain.images).abs().max() <= 1e-6 * plain.images.abs().max()
    out = tmp_path / "c.png"
    args = ["generate", PROMPT, "--model", str(tiny_dirs["sd1"]), "--subjects", "cat", "dog", "--steps", "2"]
    assert main([*args, "--out", str(out), "--checkpointing"]) == 0 and out.is_file()


@pytest.mark.slow
def test_regions_benchmark_quick_runs():
    """``benchmarks/regions_pass.py --quick``: every row kind (joint and cross attention calls, a FLUX double and
    single block through RegionalSDPA) and every variant runs at reduced width and prints its tables with a memory
    figure per cell; times and ratios are not asserted (a shared machine)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "regions_pass.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for title in ("Joint attention call", "Cross-attention call", "FluxTransformerBlock", "FluxSingleTransformerBlock"):
        assert title in out
    rows = [line for line in out.splitlines() if line.startswith("| 256 |")]
    # attention calls: plain, no mask, grouped, dense, dense with the math SDPA; blocks: the same but the math one
    assert len(rows) == 5 + 5 + 4 + 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5 + 2 * 4 and "out of memory" not in cells, row
        assert "n/a" not in cells or not sys.platform.startswith("linux"), row  # peak RSS: Linux only
        # MB, s (fwd, fwd+bwd): measured numbers (a call at this width may round to 0.000 s)
        assert float(cells[5]) >= -1 and float(cells[7]) >= 0 and float(cells[11]) >= 0, row
