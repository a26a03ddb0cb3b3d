"""SDXL: the adapter passes the cond branch's pooled embeddings and size/crop ids to the guidance forward,
checks subjects against the second tokenizer, and picks 32x32 maps at 1024 px."""

import pytest
import torch

import attncontrol
from attncontrol import AttendExcite, SubjectError
from attncontrol.models import SDXLAdapter, get_adapter
from attncontrol.testing import make_scheduler

from .conftest import processor_snapshot, seeded


def _run(pipe, controls, steps=6, **kw):
    return attncontrol.generate(
        pipe,
        kw.pop("prompt", "a cat and a dog"),
        controls,
        num_inference_steps=steps,
        generator=seeded(0),
        output_type="latent",
        **kw,
    )


def test_sdxl_pipeline_gets_the_sdxl_adapter(sdxl):
    adapter = get_adapter(sdxl)
    assert isinstance(adapter, SDXLAdapter) and adapter.family == "sdxl"
    assert adapter.default_size() == (64, 64)


def test_without_controls_it_is_exactly_the_stock_pipeline(sdxl):
    ours = _run(sdxl, [], original_size=(96, 80), prompt_2="a cat and a dog on grass").images
    stock = sdxl(
        "a cat and a dog",
        prompt_2="a cat and a dog on grass",
        original_size=(96, 80),
        num_inference_steps=6,
        generator=seeded(0),
        output_type="latent",
    ).images
    assert torch.equal(ours, stock)


def test_attend_excite_on_sdxl_changes_the_image_and_lowers_the_loss(sdxl):
    sdxl.scheduler = make_scheduler("ddim")
    before = processor_snapshot(sdxl.unet)
    plain = _run(sdxl, []).images
    out = _run(
        sdxl,
        [
            AttendExcite(
                subjects=["cat", "dog"],
                thresholds={0: 0.5},
                max_iter_to_alter=3,
                max_refinement_steps=5,
                scale_factor=400,
            )
        ],
    )
    assert (out.images - plain).abs().max() > 1e-3
    step0 = out.trace[0]
    assert step0.refinement_iterations == [5] and step0.loss[0] < step0.initial_loss[0]
    assert [r.index for r in out.guided_steps] == [0, 1, 2]
    assert processor_snapshot(sdxl.unet) == before


def test_guidance_forward_receives_the_cond_branch_conditioning(sdxl):
    seen = []

    def grab(module, args, kwargs):
        if torch.is_grad_enabled():
            seen.append(kwargs)

    hook = sdxl.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _run(
            sdxl,
            [AttendExcite(subjects=["cat"], thresholds={}, max_iter_to_alter=1)],
            original_size=(128, 96),
            crops_coords_top_left=(4, 8),
            num_images_per_prompt=2,
        )
    finally:
        hook.remove()
    assert len(seen) == 1
    added = seen[0]["added_cond_kwargs"]
    expected_ids = torch.tensor([[128.0, 96.0, 4.0, 8.0, 64.0, 64.0]] * 2)
    torch.testing.assert_close(added["time_ids"], expected_ids)
    _, _, pooled, _ = sdxl.encode_prompt("a cat and a dog", device="cpu", num_images_per_prompt=2)
    torch.testing.assert_close(added["text_embeds"], pooled)  # the cond half, not the unconditional one
    assert seen[0]["encoder_hidden_states"].shape == (2, 77, 64)


def test_subjects_must_agree_between_the_two_tokenizers(sdxl):
    out = _run(
        sdxl,
        [AttendExcite(subjects=["cat"], thresholds={}, max_iter_to_alter=1)],
        prompt_2="a cat and a dog, photo",
        steps=2,
    )
    assert out.guided_steps
    with pytest.raises(SubjectError, match=r"'dog' is at tokens \[5\].*at \[6\].*second"):
        _run(sdxl, [AttendExcite(subjects=["dog"])], prompt_2="a small cat and a dog", steps=2)
    with pytest.raises(SubjectError, match="'dog' is not in the prompt 'a cat and a bird'"):
        _run(sdxl, [AttendExcite(subjects=["dog"])], prompt_2="a cat and a bird", steps=2)


def test_default_map_resolution_is_32x32_at_1024px_for_the_sdxl_layout():
    """SDXL's block layout (no cross-attention at full latent resolution, 3 levels): 32x32 at 1024 px,
    scaled with the image size. Built with small channels; the rule depends only on the layout."""
    from diffusers import UNet2DConditionModel

    from attncontrol.models.unet import unet_layers

    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
    )

    adapter = SDXLAdapter.__new__(SDXLAdapter)  # only the layer logic is exercised: no pipeline needed
    adapter.layers = unet_layers(unet)
    assert adapter.default_attn_res((128, 128)) == (32, 32)  # 1024 px / 8
    assert adapter.default_attn_res((96, 128)) == (24, 32)  # 768 x 1024
    assert sorted(set(adapter.grids((128, 128)).values())) == [(32, 32), (64, 64)]


ALL_CONTROLS = {
    "attend-excite": lambda: [AttendExcite(subjects=["cat", "dog"], thresholds={0: 0.5}, max_refinement_steps=2)],
    "astar": lambda: [attncontrol.AStar(subjects=["cat", "dog"])],
    "refocus": lambda: [attncontrol.Refocus(boxes={"cat": (0, 0, 0.5, 1), "dog": (0.5, 0, 1, 1)})],
    "regulate": lambda: [attncontrol.Regulate(subjects=["cat", "dog"])],
}


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("method", sorted(ALL_CONTROLS))
@pytest.mark.slow
def test_every_control_runs_on_sd2_and_sdxl(request, family, method):
    pipe = request.getfixturevalue(family)
    before = processor_snapshot(pipe.unet)
    plain = _run(pipe, [], steps=4).images
    out = _run(pipe, ALL_CONTROLS[method](), steps=4)
    assert torch.isfinite(out.images).all()
    # the control changed the result (same-seed runs are bit-identical, so any change is the control's; the random
    # tiny models respond weakly, SDXL's Euler scaling most of all)
    assert (out.images - plain).abs().max() > 1e-6
    if method == "regulate":
        stats = out.trace[0].edits["regulate"]
        assert stats["quantile_after"] > stats["quantile_before"]
    else:
        assert out.trace[0].losses and out.trace[0].updated == [True]
    assert processor_snapshot(pipe.unet) == before
