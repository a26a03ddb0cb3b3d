"""CONFORM (Meral et al., CVPR 2024): a contrastive objective over attention maps, each subject's tokens (its
attributes and its noun) pulled together and different subjects pushed apart. Constants from the official code and
notebook (gemlab-vt/CONFORM: ``pipeline_conform.py``, ``notebook.ipynb``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError
from ..limits import check_count
from ..losses.conform import nt_xent
from ..ops import gaussian_smooth, token_softmax
from .base import ControlContext, PreparedControl, StepInfo, with_aliases
from .common import GuidanceOptions, TokenMaps, ae_step_sizes, binding_groups, validate_step_schedule
from .options import check_fields


@with_aliases
@dataclass
class Conform(GuidanceOptions):
    """CONFORM: NT-Xent over the subjects' token maps (``z <- z - alpha_i * grad L``).

    Args:
        subjects: each subject is one group of positives: a noun, or a phrase (``"red car"``: red and car).
        bindings: more attributes per noun, ``{"car": ["red"]}``, joining its group.
        temperature: of the NT-Xent loss (official: 0.5).
        token_softmax: x softmax_scale softmax over the tokens before taking each token's map (official pipeline
            default True; the official notebook, whose settings we follow, False: raw averaged attention).
        previous_maps: each token's map of the previous step joins its group as a constant positive (official).
        refinement_steps, refinement_iterations: at these steps, exactly this many extra updates (official: 0, 10,
            20; 20 iterations, no threshold; at most 1000 iterations).
        stop (alias ``max_iter_to_alter``): updates at steps ``start .. stop - 1`` (official notebook 30; the
            pipeline's default 25).
        scale_factor, scale_range: step size ``scale_factor * sqrt(linspace(*scale_range, steps)[i])`` (20, (1, 0.5)).
        attn_res, kernel_size, sigma, smooth_attentions, exclude_eot, softmax_scale, blocks, normalise, recipe:
            the maps (:class:`~attncontrol.controls.common.MapOptions`).
        update, velocity_scale: how the latents move (:class:`~attncontrol.controls.common.GuidanceOptions`).
    """

    method: ClassVar[str] = "conform"
    aliases: ClassVar[dict[str, str]] = {"max_iter_to_alter": "stop"}

    subjects: list = field(default_factory=list)
    bindings: dict[str, tuple[str, ...]] = field(default_factory=dict)
    temperature: float = 0.5
    token_softmax: bool = False
    previous_maps: bool = True
    refinement_steps: tuple[int, ...] = (0, 10, 20)
    refinement_iterations: int = 20
    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    stop: int | float | None = field(default=30, kw_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate_subjects()
        self.validate_window()
        validate_step_schedule(self)
        if not self.temperature > 0:
            raise OptionError(f"temperature must be > 0, got {self.temperature}")
        check_count(self.refinement_iterations, "refinement_iterations")
        self.validate_map_options()
        self.validate_update()

    def prepare(self, ctx: ControlContext) -> PreparedConform:
        return PreparedConform(self, ctx)


class PreparedConform(PreparedControl):
    def __init__(self, cfg: Conform, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        groups = binding_groups(ctx, cfg.subjects, dict(cfg.bindings))
        # per image: the tokens (all pieces of every word) and their group labels
        self.tokens = [[p for mods, noun in g for w in (*mods, noun) for p in w] for g in groups]
        self.labels = [[k for k, (mods, noun) in enumerate(g) for w in (*mods, noun) for _ in w] for g in groups]
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects, positions=[[tuple(t)] for t in self.tokens]), cfg, ctx)
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)
        self.max_refinement_steps = cfg.refinement_iterations
        self._latest: dict[int, tuple[int, torch.Tensor]] = {}
        self._previous: dict[int, torch.Tensor] = {}

    def refine_target(self, step: int) -> float | None:
        return float("-inf") if step in self.cfg.refinement_steps and self.updates_at(step) else None

    def step_size(self, step: int) -> float:
        return float(self.step_sizes[step])

    def _embeddings(self, maps, images: list[int]) -> list[torch.Tensor]:
        cfg = self.cfg
        m = maps[self.maps.key]
        if cfg.token_softmax:
            m = token_softmax(m, self.maps.keep[images], cfg.softmax_scale)
        out = []
        for row, b in enumerate(images):
            e = m[row][..., self.tokens[b]].permute(2, 0, 1)  # (tokens, rows, cols)
            if cfg.smooth_attentions:
                e = gaussian_smooth(e, cfg.kernel_size, cfg.sigma)
            out.append(e.flatten(1))
        return out

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        losses = []
        for b, e in zip(images, self._embeddings(maps, images)):
            latest = self._latest.get(b)
            if latest is not None and latest[0] < step.index:
                self._previous[b] = latest[1]
            labels = list(self.labels[b])
            if self.cfg.previous_maps and b in self._previous:
                e = torch.cat([e, self._previous[b]])
                labels = labels + labels
            losses.append(nt_xent(e, labels, self.cfg.temperature))
            self._latest[b] = (step.index, e[: len(self.labels[b])].detach())
        return torch.stack(losses)
