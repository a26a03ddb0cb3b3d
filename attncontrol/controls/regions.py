"""Regional prompting: a prompt per box. Each region's sub-prompt is encoded by the pipeline's own encoder and
appended to the text sequence after the run's prompt (the *base*); inside every cross and joint attention layer
the image tokens of a box attend to their sub-prompt (and, blended in with weight ``base_prompt_weight``, to the
base prompt), and after ``stop`` (``until``) the run is the plain pipeline on the base prompt.

The rule is Regional-Prompting-FLUX's (Chen et al., arXiv 2411.02395; instantX-research/Regional-Prompting-FLUX,
``pipeline_flux_regional.py:RegionalFluxAttnProcessor2_0.__call__``): for an image query q of the conditional
branch, ``out(q) = (1 - beta) * A(q, regional keys of q) + beta * A(q, base text + every image key)``, where the
regional keys are the sub-prompts of q's boxes and the image keys that share a box with q; sub-prompt r's text
tokens see themselves and box r's image tokens; the base text sees itself and every image token. Its defaults are
the authors' demo (``infer_flux_regional.py``): beta = 0.3, the mask for the first 10 of 24 steps. What is ours, and
why, is in ``docs/regions-design.md`` §1 and the README: background pixels read the base prompt (InvokeAI's rule),
the base is a segment of one text sequence (no second image stream in single-stream blocks), the cross-attention
families get the same blend, and outside the window the regional keys are masked (beta = 1) rather than removed.

The kernels are :mod:`attncontrol.processors.regional`; this module says which token belongs to which box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._lazy import torch
from ..errors import OptionError
from ..tokens import check_text
from .base import Control, ControlContext, Prepared, register, window_stop
from .boxes import region_list
from .fields import UNIT, option

Box = tuple[float, float, float, float]


def _region_list(value, where: str) -> list[tuple[str, list[Box]]]:
    """``[(sub-prompt, box or boxes), ...]`` or the text form, checked as every front end checks it
    (:func:`~attncontrol.controls.boxes.region_list`); at least one region."""
    if isinstance(value, (list, tuple)) and not value:
        raise OptionError(f'{where} needs at least one (sub-prompt, box) pair: [("a red car", (0.1, 0.1, 0.5, 0.9))]')
    return region_list(value, where)


# -- which token is in which box ---------------------------------------------------------------------------------


def box_tokens(box: Box, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) bool: the tokens whose cell centre lies inside ``box`` (x0 <= x < x1, y0 <= y < y1, normalised
    as the image: x to the right, y down). A box too small to hold a centre gets the cell holding its own centre,
    so every region has at least one token."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    xs = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    if not inside.any():
        r = min(rows - 1, int((y0 + y1) / 2 * rows))
        c = min(cols - 1, int((x0 + x1) / 2 * cols))
        inside[r, c] = True
    return inside


def region_labels(boxes: list[list[Box]], grid: tuple[int, int], finest: tuple[int, int] | None = None) -> torch.Tensor:
    """(rows * cols,) int64, row-major: bit r set when the token lies in region r (any of its boxes); 0 is the
    background. With ``finest`` (a grid that ``grid`` divides), the labels are found there and OR-pooled down, so
    a small box keeps its tokens on coarse map levels (InvokeAI's ``_prepare_spatial_masks`` max-pools its masks
    the same way)."""
    rows, cols = grid
    if finest is not None and tuple(finest) != tuple(grid) and finest[0] % rows == 0 and finest[1] % cols == 0:
        fine = region_labels(boxes, finest).view(finest)
        fr, fc = finest[0] // rows, finest[1] // cols
        blocks = fine.view(rows, fr, cols, fc).permute(0, 2, 1, 3).reshape(rows, cols, fr * fc)
        out = torch.zeros(rows, cols, dtype=torch.int64)
        for r in range(len(boxes)):
            out |= ((blocks >> r) & 1).amax(-1) << r
        return out.flatten()
    labels = torch.zeros(rows, cols, dtype=torch.int64)
    for r, region in enumerate(boxes):
        inside = torch.zeros(rows, cols, dtype=torch.bool)
        for box in region:
            inside |= box_tokens(box, rows, cols)
        labels |= inside.long() << r
    return labels.flatten()


# -- the options -------------------------------------------------------------------------------------------------


@register("regions", order=9)
@dataclass
class Regions(Control):
    """Regional prompting: each region's image tokens attend to its own sub-prompt, blended with the base prompt
    (Regional-Prompting-FLUX's rule, on every family's cross and joint attention; see the module docstring)."""

    regions: list = option(
        factory=list,
        help='(sub-prompt, box) pairs: [("a red car", (0.05, 0.3, 0.5, 0.9)), ("a dog", (0.55, 0.3, 0.95, 0.9))]; '
        "boxes normalised to [0, 1], x0, y0, x1, y1; a region may have several boxes.",
        check=_region_list,
        user_option=False,
    )
    base_prompt_weight: float = option(
        0.3,
        "beta: an image token's attention output is (1 - beta) * its region's + beta * the base prompt's "
        "(Regional-Prompting-FLUX's base_ratio; its demo: 0.3). 1 = the plain model.",
        range=UNIT,
        aliases=("base_ratio",),
    )
    background: str | None = option(
        None,
        "the prompt the pixels outside every box read in the regional branch (None: the base prompt, InvokeAI's "
        'rule; Regional-Prompting-FLUX\'s demo gives them a region "a photo"); "" in Python is the empty prompt.',
        check=lambda value, where: value if value is None else check_text(value, where),
    )
    image_self: str = option(
        "region",
        'which image keys an image token of the regional branch sees: "region" (tokens sharing one of its boxes, or '
        'the background with the background; Regional-Prompting-FLUX) or "all".',
        choices=("region", "all"),
    )
    kernel: str = option(
        "grouped",
        '"grouped": one unmasked attention per class of tokens with the same keys (no mask tensor at all); '
        '"dense": one boolean mask over all tokens (the reference).',
        choices=("grouped", "dense"),
    )
    stop: int | float | None = window_stop(
        10 / 24,
        "the regional masks act at steps start .. stop - 1, then the run is the plain model on the base prompt; "
        "a float is a fraction of the steps (Regional-Prompting-FLUX's demo: 10 of 24 steps).",
        aliases=("until", "mask_inject_steps"),
    )

    def check(self) -> None:
        super().check()
        if not self.regions:
            raise OptionError(
                'regions needs at least one (sub-prompt, box) pair: regions=[("a red car", (0.1, 0.1, 0.5, 0.9))]'
            )

    def extra_text(self) -> tuple[str, ...]:
        """The sub-prompts the pipeline encodes and appends to the text sequence, in order (the background's
        last, when given)."""
        texts = tuple(text for text, _ in self.regions)
        return texts if self.background is None else (*texts, self.background)

    def prepare(self, ctx: ControlContext) -> PreparedRegions:
        return PreparedRegions(self, ctx)


class PreparedRegions(Prepared):
    """Regions bound to one run: the token labels per grid, the layers masked (every cross or joint layer), the
    text segments (set once the sub-prompts are encoded) and the window. ``probe``: a callable
    ``(layer, probs)`` that, when set, receives each masked layer's image->text probabilities of the conditional
    images over every text column, base and sub-prompts (for checks)."""

    def __init__(self, cfg: Regions, ctx: ControlContext):
        self.bind_window(cfg, ctx.num_steps)
        self.cfg = cfg
        self.texts = cfg.extra_text()
        self.boxes = [boxes for _, boxes in cfg.regions]
        self.beta = float(cfg.base_prompt_weight)
        self.image_self = cfg.image_self
        self.kernel = cfg.kernel
        self.n_images = len(ctx.prompts)
        self.cfg_batch = ctx.cfg_batch
        cross = ctx.grids.get("cross", {})
        self.grid_of = {name: grid for grid, names in cross.items() for name in names}
        finest = max(cross, key=lambda g: g[0] * g[1]) if cross else None
        self.labels = {grid: self._labels(grid, finest).to(ctx.device) for grid in cross}
        self.segments: tuple[int, ...] = (ctx.text.base_length,)
        self.step = 0
        self.probe: Any = None
        # a negative branch run as its own forward but zero-padded to the joined text (a caller that needs equal
        # lengths): it attends to its own tokens only, as a batched negative does
        self.padded_negative = False

    def _labels(self, grid: tuple[int, int], finest) -> torch.Tensor:
        """The boxes' bits; with a background prompt, the pixels outside every box are one more region (its bit
        after the boxes'), as Regional-Prompting-FLUX's demo makes them."""
        labels = region_labels(self.boxes, grid, finest)
        if self.cfg.background is None:
            return labels
        return labels | ((labels == 0).long() << len(self.boxes))

    @property
    def layers(self) -> list[str]:
        return list(self.grid_of)

    def bind_text(self, base_len: int, region_lens: list[int]) -> None:
        """The text segments' lengths, base first, once the sub-prompts are encoded (before the run starts)."""
        self.segments = (int(base_len), *(int(n) for n in region_lens))

    def begin_step(self, step: int) -> None:
        self.step = step

    @property
    def weight(self) -> float:
        """The base weight at the current step: beta inside the window, 1 (the plain model) outside it."""
        return self.beta if self.in_window(self.step) else 1.0
