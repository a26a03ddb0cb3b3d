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


# -- the classic path against the installed diffusers' processors ------------------------------------------------
# processors/classic.py re-implements diffusers' AttnProcessor maths: one float64 layer per option it claims to
# handle (self and cross, an additive mask, cross norm, group norm, spatial norm, 4-D input, residual, rescale).
# When an upgrade of diffusers changes what its processors compute, these fail.

CLASSIC_LAYERS = {  # name: the layer's Attention options and its inputs (context: channels; temb: channels)
    "self": {},
    "self-mask": {"mask": True},
    "cross": {"context": 12},
    "cross-mask": {"context": 12, "mask": True},
    "cross-layer-norm": {"context": 12, "mask": True, "cross_attention_norm": "layer_norm"},
    "cross-group-norm": {"context": 12, "cross_attention_norm": "group_norm", "cross_attention_norm_num_groups": 4},
    "group-norm-4d-residual": {
        "four_d": True,
        "norm_num_groups": 8,
        "bias": True,
        "residual_connection": True,
        "rescale_output_factor": 2.0,
    },
    "spatial-norm": {"four_d": True, "temb": 4, "spatial_norm_dim": 4, "residual_connection": True},
}


def _classic_layer(name: str):
    """A float64 ``Attention`` (32 channels, 2 heads of 8) with seeded random weights, and its inputs."""
    from diffusers.models.attention_processor import Attention

    options = dict(CLASSIC_LAYERS[name])
    four_d, context_dim = options.pop("four_d", False), options.pop("context", None)
    masked, temb_dim = options.pop("mask", False), options.pop("temb", None)
    gen = torch.Generator().manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=8, cross_attention_dim=context_dim, **options).double().eval()
    with torch.no_grad():
        for key, p in attn.named_parameters():  # norms too: their scales near 1, not left at ones and zeros
            scale = 1.0 if p.ndim == 1 and key.endswith("weight") else 0.0
            p.copy_(scale + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    hidden = torch.randn((2, 32, 3, 4) if four_d else (2, 12, 32), generator=gen, dtype=torch.float64)
    context = None if context_dim is None else torch.randn(2, 5, context_dim, generator=gen, dtype=torch.float64)
    keys = 12 if context is None else 5
    mask = None
    if masked:  # the UNet's form: (batch, 1, keys), additive; each image masks different keys
        mask = torch.randn(2, 1, keys, generator=gen, dtype=torch.float64)
        mask[0, 0, -2:] = mask[1, 0, :1] = -10000.0
    temb = None if temb_dim is None else torch.randn(2, temb_dim, 2, 2, generator=gen, dtype=torch.float64)
    return attn, hidden, context, mask, temb


def _diffusers_probabilities(attn, processor, *inputs):
    """The processor's output, and the probabilities it formed through ``attn.get_attention_scores``."""
    seen = []
    original = attn.get_attention_scores
    attn.get_attention_scores = lambda *a, **k: seen.append(original(*a, **k)) or seen[-1]
    try:
        out = processor(attn, *inputs)
    finally:
        del attn.get_attention_scores
    return out, seen


@pytest.mark.parametrize("name", list(CLASSIC_LAYERS))
def test_classic_path_computes_what_diffusers_processors_compute(name):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from attncontrol.processors.classic import CLASSIC

    attn, hidden, context, mask, temb = _classic_layer(name)
    inputs = (hidden, context, mask, temb)
    with torch.no_grad():
        ref, probs = _diffusers_probabilities(attn, AttnProcessor(), *inputs)
        sdpa = AttnProcessor2_0()(attn, *inputs)
        seen = []
        ours = CLASSIC.explicit(attn, *inputs, on_probs=lambda p, heads: seen.append((p, heads)))
        edited = CLASSIC.explicit(attn, *inputs, on_scores=lambda s, heads: s.softmax(-1))  # float32 scores
    tight = dict(rtol=1e-10, atol=1e-12)
    assert ours.dtype == torch.float64 and ours.shape == hidden.shape
    torch.testing.assert_close(ours, ref, **tight, msg=lambda m: f"classic path vs diffusers' AttnProcessor: {m}")
    torch.testing.assert_close(ours, sdpa, **tight, msg=lambda m: f"classic path vs AttnProcessor2_0: {m}")
    torch.testing.assert_close(edited, sdpa, rtol=1e-5, atol=1e-5)
    assert len(probs) == 1 and len(seen) == 1 and seen[0][1] == attn.heads
    torch.testing.assert_close(seen[0][0], probs[0], **tight)  # the probabilities the store records


@pytest.mark.parametrize("name", [n for n, spec in CLASSIC_LAYERS.items() if "temb" not in spec])
def test_classic_observe_gives_diffusers_probabilities_of_the_conditional_half(name):
    """``observe`` (the attention observer's path, beside the layer's own processor) forms the probabilities
    diffusers' AttnProcessor forms, for the conditional (second) half of the batch. Spatial-norm layers are left
    out: ``observe`` takes no ``temb``."""
    from diffusers.models.attention_processor import AttnProcessor

    from attncontrol.processors.classic import CLASSIC

    attn, hidden, context, mask, temb = _classic_layer(name)
    with torch.no_grad():
        _, probs = _diffusers_probabilities(attn, AttnProcessor(), hidden, context, mask, temb)
        observed = CLASSIC.observe(attn, hidden, context, mask, lambda t: t[t.shape[0] // 2 :])
    torch.testing.assert_close(observed, probs[0][attn.heads :], rtol=1e-10, atol=1e-12)


# -- the forms declare what they can do; the adapters pick them -------------------------------------------------


def test_the_forms_declare_their_capabilities_and_a_form_missing_a_method_is_refused():
    from attncontrol.processors.classic import CLASSIC
    from attncontrol.processors.form import AttentionForm
    from attncontrol.processors.joint import JOINT, ROTARY_JOINT

    assert CLASSIC.explicit_scores and CLASSIC.observes
    for form in (JOINT, ROTARY_JOINT):
        assert isinstance(form, AttentionForm) and not form.explicit_scores and not form.observes
    with pytest.raises(TypeError, match=r"\['explicit'\]"):

        class NoExplicit(AttentionForm):
            explicit_scores = True

            def maps(self, attn, args, n_image, kinds, columns):
                return {}

    with pytest.raises(TypeError, match=r"\['edited'\]"):

        class NoEdited(AttentionForm):
            def maps(self, attn, args, n_image, kinds, columns):
                return {}


def test_the_capture_processor_asks_the_forms_interface_not_hasattr():
    from pathlib import Path

    import attncontrol.processors as processors

    for module in ("capture.py", "recipients.py"):
        source = (Path(processors.__file__).parent / module).read_text(encoding="utf-8")
        assert "hasattr(" not in source, module


def test_the_sd_adapter_gives_its_layers_the_classic_form(sd1):
    from attncontrol.models import get_adapter
    from attncontrol.processors.classic import CLASSIC

    layers = get_adapter(sd1).layers
    assert layers and all(la.ops is CLASSIC for la in layers)
