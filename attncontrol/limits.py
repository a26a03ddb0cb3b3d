"""Bounds that every front end applies (the Python API, the command line, batch files, the app), so that a typo
in a number fails at once with a message instead of asking for terabytes or running for days. Torch-free: the
command line checks them before it imports anything heavy."""

from __future__ import annotations

from .errors import ResolutionError

# an image side, and an image's pixels: 8192 px per side, 4096 x 4096 in all (SDXL's native size is 1024 x 1024,
# FLUX's largest about 2048 x 2048); a larger image would ask for far more memory than any GPU has
MAX_SIDE = 8192
MAX_PIXELS = 4096 * 4096
# any count of iterations a method option sets (refinement iterations per step, InitNO's rounds and steps, ...):
# the published defaults are 5 to 50; 1000 iterations of one step already take hours on a large model
MAX_ITERATIONS = 1000
# what torch.Generator.manual_seed takes
SEED_RANGE = (0, 2**64 - 1)
# seeds in one batch (--seeds, a line's "seeds"): a range is counted before it is expanded
MAX_SEEDS = 1_000_000
# regions of regional prompting (one bit each in a token's label; the app draws at most this many boxes)
MAX_BOXES = 8


def check_image_size(height, width, where: tuple[str, str] = ("height", "width")) -> None:
    """``height`` and ``width`` (None: the model's default) at most :data:`MAX_SIDE` each and :data:`MAX_PIXELS`
    together; ``where`` names them as the caller's user gave them (``--height``, ``height=``)."""
    for name, value in zip(where, (height, width)):
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SIDE:
            raise ResolutionError(f"{name} {value} is larger than {MAX_SIDE} px, the largest side attncontrol makes")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (height, width)) and height * width > MAX_PIXELS:
        raise ResolutionError(
            f"{where[0]} {height} x {where[1]} {width} is {height * width} pixels; attncontrol makes at most "
            f"{MAX_PIXELS} ({int(MAX_PIXELS**0.5)} x {int(MAX_PIXELS**0.5)})"
        )
