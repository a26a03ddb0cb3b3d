"""Attention observed during sampling: equal to diffusers' own A&E capture, bounded, visualised, measured."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import attncontrol
from attncontrol import AttendExcite, Regulate, SubjectNotInPromptError
from attncontrol.attention import AttentionMaps, attention_metrics, colormap
from attncontrol.cli import main

from .conftest import ae_reference, processor_snapshot, seeded

PROMPT = "a cat and a dog"  # tokens: <sot> a cat and a dog <eot>: cat at 2, dog at 5


def _run(pipe, controls=(), steps=4, **kw):
    return attncontrol.generate(
        pipe, kw.pop("prompt", PROMPT), list(controls), num_inference_steps=steps, generator=seeded(0), **kw
    )


@pytest.mark.slow
def test_observing_changes_nothing(sd1):
    plain = _run(sd1, output_type="latent").images
    seen = _run(sd1, output_type="latent", attention=["cat", "dog"])
    torch.testing.assert_close(seen.images, plain, rtol=0, atol=0)
    ae = [AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=2)]
    guided = _run(sd1, ae, output_type="latent").images
    torch.testing.assert_close(_run(sd1, ae, output_type="latent", attention=True).images, guided, rtol=0, atol=0)


def test_step_maps_equal_diffusers_ae_capture(sd1):
    """The observer's step-0 maps against diffusers' AttentionStore + processors (the A&E pipeline's own capture)
    on the conditional forward of the same latents, A&E's recipe applied by hand: [1:-1] slice, x100, softmax."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (  # noqa: E501
        AttentionStore,
    )

    latents = torch.randn(1, 4, 32, 32, generator=seeded(3))
    out = _run(sd1, steps=3, latents=latents, attention=["cat", "dog"], output_type="latent")
    maps = out.attention.maps  # (steps, images, subjects, rows, cols)
    rows, cols = maps.shape[-2:]
    assert out.attention.steps == [0, 1, 2] and maps.shape == (3, 1, 2, rows, cols)

    ref = ae_reference(sd1)
    ref.attention_store = AttentionStore((rows, cols))
    ref.register_attention_control()
    sd1.scheduler.set_timesteps(3)
    t0 = sd1.scheduler.timesteps[0]
    emb = sd1.encode_prompt(PROMPT, "cpu", 1, False)[0]
    x = latents.clone().requires_grad_(True)  # diffusers' processor records only when probabilities need grad
    sd1.unet(sd1.scheduler.scale_model_input(x, t0), t0, encoder_hidden_states=emb)
    agg = ref.attention_store.aggregate_attention(["up", "down", "mid"])  # (rows, cols, 77)
    expected = torch.softmax(agg[:, :, 1:-1] * 100, dim=-1)
    torch.testing.assert_close(maps[0, 0, 0], expected[:, :, 2 - 1].detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps[0, 0, 1], expected[:, :, 5 - 1].detach(), atol=1e-5, rtol=1e-4)
    raw = out.attention.raw[0, 0]
    torch.testing.assert_close(raw[0], agg[:, :, 2].detach(), atol=1e-6, rtol=1e-4)


def test_per_prompt_subjects_batch_and_no_cfg(sd1):
    out = _run(
        sd1,
        prompt=["a cat and a dog", "a red car with a clock"],
        steps=3,
        num_images_per_prompt=2,
        attention=[["cat", "dog"], ["car", "clock"]],
        guidance_scale=1.0,
    )
    att = out.attention
    assert att.labels == [["cat", "dog"]] * 2 + [["car", "clock"]] * 2
    assert att.maps.shape[:3] == (3, 4, 2)
    assert torch.isfinite(att.maps).all() and (att.maps >= 0).all() and (att.maps <= 1).all()
    # each image's maps are its own (different seeds/prompts give different maps)
    assert (att.maps[:, 0] - att.maps[:, 1]).abs().max() > 0
    assert att.map("clock", image=2).shape == att.maps.shape[-2:]


def test_editor_layers_are_observed_with_the_edit(sd1):
    base = _run(sd1, steps=4, attention=["cat", "dog"])
    edited = _run(sd1, [Regulate(subjects=["cat", "dog"])], steps=4, attention=True)
    assert edited.attention.maps.shape == base.attention.maps.shape
    # Regulate edits the first half of the steps: the observed step-0 maps are the edited ones
    assert (edited.attention.raw[0] - base.attention.raw[0]).abs().max() > 1e-4


def test_bad_requests_fail_before_model_work_and_restore(sd1):
    before = processor_snapshot(sd1.unet)
    with pytest.raises(ValueError, match="name them"):
        _run(sd1, attention=True)
    with pytest.raises(SubjectNotInPromptError, match="horse"):
        _run(sd1, attention=["cat", "horse"])
    with pytest.raises(TypeError, match="attention"):
        _run(sd1, attention="cat")
    assert processor_snapshot(sd1.unet) == before
    out = _run(sd1, steps=2)
    assert out.attention is None


def test_metrics_on_hand_made_maps():
    n = 8
    left = torch.zeros(n, n)
    left[:, : n // 2] = 1.0
    right = left.flip(1)
    full = torch.ones(n, n)
    const = lambda c: torch.full((n, n), c)  # noqa: E731
    # disjoint halves: no overlap; identical maps: overlap 1; half vs everything: each left pixel min(2/N, 1/N)
    assert attention_metrics(torch.stack([left, right])[None])["subject_overlap"] == pytest.approx(0.0)
    assert attention_metrics(torch.stack([full, full])[None])["subject_overlap"] == pytest.approx(1.0)
    assert attention_metrics(torch.stack([left, full])[None])["subject_overlap"] == pytest.approx(0.5)
    # constant maps are unchanged by the smoothing: the weakest peak is the smaller constant; mean over steps
    steps = torch.stack([torch.stack([const(0.3), const(0.7)]), torch.stack([const(0.5), const(0.2)])])
    assert attention_metrics(steps)["min_subject_attention"] == pytest.approx((0.3 + 0.2) / 2)
    one = attention_metrics(const(0.4)[None, None])
    assert one["min_subject_attention"] == pytest.approx(0.4) and np.isnan(one["subject_overlap"])
    # three subjects: the worst pair counts
    assert attention_metrics(torch.stack([left, right, left])[None])["subject_overlap"] == pytest.approx(1.0)


def _maps_with_hot_pixel(row, col, steps=3, size=8):
    maps = torch.zeros(steps, 1, 1, size, size)
    maps[:, 0, 0, row, col] = 1.0
    return AttentionMaps([["cat"]], list(range(steps)), [999.0, 500.0, 1.0][:steps], maps, maps.clone())


def test_heatmap_is_hot_where_the_map_is():
    att = _maps_with_hot_pixel(2, 5)
    base = Image.new("RGB", (64, 64), "black")
    heat = np.asarray(att.heatmap("cat", base=base).convert("L"), dtype=float)
    assert heat.shape == (64, 64)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 2 * 8 <= y < 3 * 8 and 5 * 8 <= x < 6 * 8  # the hot cell (8 px per map cell)
    assert colormap(np.array([1.0])).sum() > colormap(np.array([0.0])).sum()
    with pytest.raises(KeyError, match="dog"):
        att.heatmap("dog")
    with pytest.raises(KeyError, match="step 7"):
        att.map("cat", step=7)


def test_gif_and_save(tmp_path):
    att = _maps_with_hot_pixel(1, 1)
    for step in range(3):  # the hot pixel moves: three distinct frames (identical frames would be merged)
        att.maps[step, 0, 0] = 0
        att.maps[step, 0, 0, 1, 1 + 2 * step] = 1.0
    att.images = [Image.new("RGB", (64, 64), "gray")]
    with Image.open(io.BytesIO(att.gif("cat"))) as gif:
        assert gif.n_frames == 3 and gif.size == (64, 64)
    written = att.save(tmp_path / "att")
    assert sorted(p.name for p in written) == ["cat.gif", "cat.png", "maps.pt"]
    saved = torch.load(tmp_path / "att" / "maps.pt")
    assert saved["labels"] == ["cat"] and torch.equal(saved["maps"], att.maps[:, 0])


def test_subjects_whose_names_reduce_alike_get_their_own_files(tmp_path):
    from attncontrol.attention import unique_stems

    assert unique_stems(["🐱", "🐶"]) == ["cat-face", "dog-face"]
    assert unique_stems(["red car", "red-car", "cat"]) == ["red-car-1", "red-car-2", "cat"]
    assert unique_stems(["\u2063", "\u2063"]) == ["invisible-separator-1", "invisible-separator-2"]
    maps = _maps_with_hot_pixel(1, 1).maps.repeat(1, 1, 2, 1, 1)
    att = AttentionMaps([["red car", "red-car"]], [0, 1, 2], [999.0, 500.0, 1.0], maps, maps.clone())
    written = att.save(tmp_path / "att")
    assert len(written) == len(set(written)) == 5 and all(p.is_file() for p in written)


def test_cli_save_attention(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "o.png"
    code = main(
        [
            "generate",
            PROMPT,
            "--model",
            str(tiny_dirs["sd1"]),
            "--subjects",
            "cat",
            "dog",
            "--steps",
            "3",
            "--out",
            str(out),
            "--save-attention",
            str(tmp_path / "att"),
        ]
    )
    assert code == 0 and out.is_file()
    names = sorted(p.name for p in (tmp_path / "att").iterdir())
    assert names == ["cat.gif", "cat.png", "dog.gif", "dog.png", "maps.pt"]
    with Image.open(tmp_path / "att" / "cat.png") as im:
        assert im.size == (64, 64)
    assert "min_subject_attention" in capsys.readouterr().err
    code = main(
        [
            "generate",
            PROMPT,
            "--model",
            str(tiny_dirs["sd1"]),
            "--no-control",
            "--steps",
            "2",
            "--out",
            str(out),
            "--save-attention",
            str(tmp_path / "a2"),
        ]
    )
    assert code == 2 and "--subjects" in capsys.readouterr().err
    assert json.loads(Image.open(out).text["parameters"])["steps"] == 3  # the failed run left the old file alone


def test_sdxl_and_sd2_are_observed(sdxl, sd2):
    plain = attncontrol.generate(sdxl, PROMPT, [], num_inference_steps=3, generator=seeded(0), output_type="latent")
    seen = attncontrol.generate(
        sdxl, PROMPT, [], num_inference_steps=3, generator=seeded(0), output_type="latent", attention=["cat", "dog"]
    )
    torch.testing.assert_close(seen.images, plain.images, rtol=0, atol=0)
    assert seen.attention.maps.shape[:3] == (3, 1, 2) and torch.isfinite(seen.attention.maps).all()
    out = _run(sd2, steps=3, attention=["cat", "dog"])
    assert out.attention.maps.shape[:3] == (3, 1, 2) and torch.isfinite(out.attention.maps).all()
