"""Map orientation (rows = height) and sizes that are not powers of two."""

import torch

import attncontrol
from attncontrol import AttendExcite

from .conftest import seeded


def test_a_bright_feature_row_comes_back_as_that_row_of_the_map(sd1):
    """Make one row of the features entering a cross-attention block stand out; the captured map of a
    non-square image (24x40 latents -> 12x20 maps) must show that row, not a column or a scrambled band."""
    from attncontrol.models import get_adapter
    from attncontrol.processors import capture_layers
    from attncontrol.store import AttentionStore

    rows, cols, bright = 12, 20, 3
    adapter = get_adapter(sd1)
    layers = [la for la in adapter.layers if la.name.startswith("down_blocks.1") and la.kind == "cross"]
    store = AttentionStore(layers, {la.name: (rows, cols) for la in layers})

    def mark_row(module, args):
        hidden = args[0].clone()
        hidden[:, :, bright, :] += 25.0
        return (hidden, *args[1:])

    hook = sd1.unet.down_blocks[1].attentions[0].register_forward_pre_hook(mark_row)
    try:
        with capture_layers(sd1.unet, adapter.layers, store):
            store.active = True
            try:
                sd1.unet(
                    torch.randn(1, 4, 24, 40, generator=seeded(0)),
                    10,
                    encoder_hidden_states=torch.randn(1, 77, 32, generator=seeded(1)),
                )
            except Exception as err:  # EarlyExit after the only captured layer
                assert type(err).__name__ == "EarlyExit"
            maps = store.maps((rows, cols))[0]  # (12, 20, 77)
    finally:
        hook.remove()
    per_pixel = (maps - maps.mean((0, 1))).abs().sum(-1)  # how far each pixel's token distribution departs
    assert per_pixel.mean(1).argmax().item() == bright
    assert per_pixel[bright].min() > per_pixel[torch.arange(rows) != bright].max()


def test_sizes_that_are_not_multiples_of_64(sd1):
    # 72 x 104 px -> 36 x 52 latents -> 18 x 26 maps (odd sizes deeper down: see test_capture)
    out = attncontrol.generate(
        sd1,
        "a cat and a dog",
        [AttendExcite(subjects=["cat", "dog"], thresholds={}, max_iter_to_alter=2)],
        height=72,
        width=104,
        num_inference_steps=3,
        generator=seeded(0),
        output_type="latent",
    )
    assert out.images.shape == (1, 4, 36, 52)
    assert len(out.guided_steps) == 2 and all(0 < r.loss[0] <= 1 for r in out.guided_steps)
