import pytest
import torch

from attncontrol.models.unet import unet_layers
from attncontrol.processors.capture import CaptureProcessor, capture_layers
from attncontrol.store import AttentionStore, EarlyExit, grid_after

from .conftest import processor_snapshot


def _measure_query_lengths(unet, latent_hw, cond):
    """Run a forward and record every attention module's query length (measured, not computed)."""
    seen, hooks = {}, []
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args, kw, name=name: seen.__setitem__(
                        name, (args[0] if args else kw["hidden_states"]).shape[1]
                    ),
                    with_kwargs=True,
                )
            )
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, *latent_hw), 10, encoder_hidden_states=cond)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("latent_hw", [(32, 32), (24, 40), (18, 30)])
def test_layer_resolution_equals_measured_query_length(sd1, latent_hw):
    layers = unet_layers(sd1.unet)
    assert [la.kind for la in layers].count("cross") == 4
    measured = _measure_query_lengths(sd1.unet, latent_hw, torch.randn(1, 77, 32))
    for la in layers:
        rows, cols = grid_after(latent_hw, la.level)
        assert measured[la.module_name] == rows * cols, la.name


def test_layers_are_in_execution_order(sd1):
    order = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a, name=n: order.append(name))
        for n, m in sd1.unet.named_modules()
        if n.endswith(("attn1", "attn2"))
    ]
    with torch.no_grad():
        sd1.unet(torch.randn(1, 4, 32, 32), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    for h in hooks:
        h.remove()
    assert [la.module_name for la in unet_layers(sd1.unet)] == order


def _store(unet, latent_hw=(32, 32), names=None):
    layers = [la for la in unet_layers(unet) if la.kind == "cross"]
    if names:
        layers = [la for la in layers if la.name in names]
    return AttentionStore(layers, {la.name: grid_after(latent_hw, la.level) for la in layers})


def test_only_needed_layers_get_the_capture_processor_and_all_are_restored(sd1):
    before = processor_snapshot(sd1.unet)
    store = _store(sd1.unet)
    with capture_layers(sd1.unet, unet_layers(sd1.unet), store):
        now = sd1.unet.attn_processors
        for name, proc in now.items():
            if name.endswith("attn2.processor"):
                assert isinstance(proc, CaptureProcessor)
                assert id(proc.original) == before[name]
            else:
                assert id(proc) == before[name]  # self-attention keeps its own (SDPA) processor
    assert processor_snapshot(sd1.unet) == before


def test_processors_restored_when_an_error_is_raised_inside(sd1):
    before = processor_snapshot(sd1.unet)
    with pytest.raises(RuntimeError, match="boom"), capture_layers(sd1.unet, unet_layers(sd1.unet), _store(sd1.unet)):
        raise RuntimeError("boom")
    assert processor_snapshot(sd1.unet) == before


def test_outside_guidance_the_output_is_unchanged(sd1):
    x, cond = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = sd1.unet(x, 10, encoder_hidden_states=cond).sample
        with capture_layers(sd1.unet, unet_layers(sd1.unet), _store(sd1.unet)):
            out = sd1.unet(x, 10, encoder_hidden_states=cond).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_guidance_capture_records_probabilities_and_stops_early(sd1):
    store = _store(sd1.unet)
    ran_after = []
    hook = sd1.unet.up_blocks[1].register_forward_pre_hook(lambda *a: ran_after.append(1))
    x = torch.randn(2, 4, 32, 32, requires_grad=True)
    try:
        with capture_layers(sd1.unet, unet_layers(sd1.unet), store):
            store.active = True
            with pytest.raises(EarlyExit):
                sd1.unet(x, 10, encoder_hidden_states=torch.randn(2, 77, 32))
            maps = store.maps((16, 16))
            assert len(store.captured("cross", (16, 16))) == 4
    finally:
        hook.remove()
    assert not ran_after  # nothing after the last captured layer ran
    assert maps.shape == (2, 16, 16, 77)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 16, 16))  # probabilities over the 77 keys
    assert maps.requires_grad  # differentiable w.r.t. the latents


def test_explicit_path_matches_the_original_processor(sd1):
    """With early exit off, the explicit (recording) forward computes what SDPA computes."""
    x, cond = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
    store = _store(sd1.unet)
    store.early_exit = False
    with torch.no_grad():
        ref = sd1.unet(x, 10, encoder_hidden_states=cond).sample
        with capture_layers(sd1.unet, unet_layers(sd1.unet), store):
            store.active = True
            out = sd1.unet(x, 10, encoder_hidden_states=cond).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_cross_attention_kwargs_reach_the_original_processor(sd1):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Scaled(AttnProcessor2_0):
        calls = []

        def __call__(
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, my_gain=1.0
        ):
            Scaled.calls.append(my_gain)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * my_gain

    sd1.unet.set_attn_processor(Scaled())
    with torch.no_grad(), capture_layers(sd1.unet, unet_layers(sd1.unet), _store(sd1.unet)):
        sd1.unet(
            torch.randn(1, 4, 32, 32),
            10,
            encoder_hidden_states=torch.randn(1, 77, 32),
            cross_attention_kwargs={"my_gain": 0.5},
        )
    assert Scaled.calls and set(Scaled.calls) == {0.5}


def test_store_rejects_a_wrong_resolution(sd1):
    store = _store(sd1.unet, latent_hw=(16, 16))  # claims 8x8 layers, the forward gives 16x16
    with capture_layers(sd1.unet, unet_layers(sd1.unet), store):
        store.active = True
        with pytest.raises(ValueError, match="queries"):
            sd1.unet(torch.randn(1, 4, 32, 32), 10, encoder_hidden_states=torch.randn(1, 77, 32))
