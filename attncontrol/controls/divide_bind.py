"""Divide & Bind (Li et al., BMVC 2023, arXiv:2307.10864): spread each subject's attention (total variation) and
bind its attributes' maps to it (Jensen-Shannon), A&E-style latent updates. Constants and the loop from the
official code (boschresearch/Divide-and-Bind)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .._lazy import F, torch
from ..ops import gaussian_smooth, token_softmax
from .base import ControlContext, PreparedControl, register, subjects_field, window_stop
from .common import (
    GuidanceOptions,
    TokenMaps,
    ae_step_sizes,
    binding_groups,
    bindings_field,
    count_field,
    scale_factor_field,
    scale_range_field,
    thresholds_field,
)
from .fields import option
from .vocabulary import Evaluation, MapKey, Row, StepInfo, StepPlan

# -- the loss ----------------------------------------------------------------------------------------------------


def total_variation(x: torch.Tensor, form: str = "official") -> torch.Tensor:
    """Attendance measure of a (rows, cols) map: mean absolute horizontal neighbour difference plus a vertical
    term. ``form="official"``: as coded, the last row against every row from the second on (0 for two rows);
    ``"neighbour"``: the mean absolute vertical neighbour difference (the paper's form)."""
    horizontal = (x[:, :-1] - x[:, 1:]).abs().mean()
    upper = x[:-1, :] if form == "neighbour" else x[-1:, :]  # as coded: the last row, broadcast
    return horizontal + (upper - x[1:, :]).abs().mean()


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``0.5 KL(p || m) + 0.5 KL(q || m)``, m = (p + q) / 2, natural log, over all entries (not renormalised)."""
    m = (p + q) / 2
    return 0.5 * (p * (p.log() - m.log())).sum() + 0.5 * (q * (q.log() - m.log())).sum()


def binding_divergence(subject: torch.Tensor, attribute: torch.Tensor, subject_tv: torch.Tensor) -> torch.Tensor:
    """JSD between a subject's and its attribute's spatial distributions: the attribute rescaled to the subject's
    peak, each softmaxed over the pixels, both shifted down by q * max(subject distribution) (q = 0.3 when the
    subject's TV < 0.1, else 0.2), clipped at 0, plus 1e-5."""
    scaled = attribute / attribute.max().clamp_min(1e-12) * subject.max()
    p, q = torch.softmax(subject.flatten(), 0), torch.softmax(scaled.flatten(), 0)
    quantile = 0.3 if float(subject_tv.detach()) < 0.1 else 0.2
    cut = quantile * p.max()
    return jensen_shannon(torch.relu(p - cut) + 1e-5, torch.relu(q - cut) + 1e-5)


def binding_weight(step: int) -> float:
    """The official weight of the binding term: 1 before step 10, 5 before step 20, 10 after."""
    return 1.0 if step < 10 else 5.0 if step < 20 else 10.0


def divide_bind_loss(
    subjects: torch.Tensor, attributes: list[list[torch.Tensor]], step: int, form: str = "official"
) -> tuple[torch.Tensor, float]:
    """``max_j (-TV(S_j) + w(step) * sum_a JSD(S_j, A_a))`` over subjects j and their attribute maps; returns (loss,
    the smallest subject TV, which the refinement compares with its thresholds)."""
    terms, tvs = [], []
    for j in range(subjects.shape[0]):
        tv = total_variation(subjects[j], form)
        term = -tv
        for attr in attributes[j]:
            term = term + binding_weight(step) * binding_divergence(subjects[j], attr, tv)
        terms.append(term)
        tvs.append(float(tv.detach()))
    return torch.stack(terms).max(), min(tvs)


# -- the options -------------------------------------------------------------------------------------------------


def _thresholds() -> dict[int, float]:
    return {0: 0.05, 10: 0.2, 20: 0.3}


@register("divide-bind", order=5)
@dataclass
class DivideBind(GuidanceOptions):
    """Divide & Bind: ``L = max_j (-TV(S_j) + w_i * JSD(S_j, A_j))``, ``z <- z - alpha_i * grad L``."""

    subjects: list = subjects_field(
        "nouns, or phrases whose leading words are the noun's attributes ('red car': attribute red)."
    )
    bindings: dict[str, tuple[str, ...]] = bindings_field(
        "more attributes per noun, {'car': ['red', 'shiny']} (also for nouns that are subjects)."
    )
    scale_factor: float = scale_factor_field()
    scale_range: tuple[float, float] = scale_range_field()
    thresholds: dict[int, float] = thresholds_field(
        _thresholds,
        "{step: T}: refine while the smallest subject TV < T (official: {0: 0.05, 10: 0.2, 20: 0.3}).",
        high=None,
    )
    max_refinement_steps: int = count_field(20, "refinement cap after step 0 (official: 20).", app=(0, 50))
    first_refinement_steps: int = count_field(50, "refinement cap at step 0 (official: 50).")
    tv: str = option(
        "official",
        "'official' (as coded: the vertical term compares the last row with every row) or 'neighbour'.",
        choices=("official", "neighbour"),
    )
    attribute_levels: str = option(
        "finer",
        "'finer': attribute maps from the cross-attention levels finer than the subject maps (64x64 and 32x32 at "
        "512 px), nearest-resized to the subject grid, as the official code; 'same'.",
        choices=("finer", "same"),
    )
    stop: int | float | None = window_stop(25, "latents are updated at steps start .. stop - 1 (official: 25).")

    def prepare(self, ctx: ControlContext) -> PreparedDivideBind:
        return PreparedDivideBind(self, ctx)


# -- the step plan and the evaluation ----------------------------------------------------------------------------


def _tv_below(target: float) -> Callable[[Row], bool]:
    """The official test: refine while the smallest subject TV is below the step's threshold."""

    def test(row: Row) -> bool:
        return row.stats.get("min_tv", 0.0) < target

    return test


class PreparedDivideBind(PreparedControl):
    """Its evaluation reports per image ``min_tv``, the smallest subject TV, which its refinement test reads."""

    def __init__(self, cfg: DivideBind, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.groups = binding_groups(ctx, cfg.subjects, dict(cfg.bindings))
        nouns = [[noun for _, noun in groups] for groups in self.groups]
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects, positions=nouns), cfg, ctx)
        finer = [g for g in ctx.cross_resolutions if g[0] > self.resolution[0]]
        grids = finer if cfg.attribute_levels == "finer" and finer else [self.resolution]
        self.attribute_keys = [MapKey("cross", g, cfg.block_tuple, cfg.normalise) for g in grids]
        self.attribute_weights = [len(ctx.select(k)) for k in self.attribute_keys]
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)

    def map_keys(self) -> list[MapKey]:
        return [self.maps.key, *[k for k in self.attribute_keys if k != self.maps.key]]

    def plan(self, step: int) -> StepPlan:
        target = self.cfg.thresholds.get(step) if self.in_window(step) else None
        cap = self.cfg.first_refinement_steps if step == 0 else self.cfg.max_refinement_steps
        refine = None if target is None else _tv_below(target)
        return self.make_plan(step, self.step_sizes[step], refine=refine, max_refinement=cap)

    def _attribute_probs(self, maps, images: list[int]) -> torch.Tensor:
        """Token-softmaxed attribute maps at the subject grid: the finer levels nearest-resized, weighted by their
        number of layers (the official mean over all their maps, for equal head counts)."""
        rows, cols = self.resolution
        total: torch.Tensor | None = None
        for key, weight in zip(self.attribute_keys, self.attribute_weights):
            m = maps[key].permute(0, 3, 1, 2)
            if tuple(m.shape[-2:]) != (rows, cols):
                m = F.interpolate(m, size=(rows, cols), mode="nearest")
            total = weight * m if total is None else total + weight * m
        assert total is not None  # at least the subject grid
        avg = (total / sum(self.attribute_weights)).permute(0, 2, 3, 1)
        return token_softmax(avg, self.maps.keep[images], self.cfg.softmax_scale)

    def evaluate(self, maps, images: list[int], step: StepInfo, carry: list) -> Evaluation:
        cfg = self.cfg
        subjects = self.maps.per_image(maps, images)
        attr_probs = self._attribute_probs(maps, images)
        losses, stats = [], []
        for row, (b, s) in enumerate(zip(images, subjects)):
            attrs = []
            for mods, _ in self.groups[b]:
                found = [attr_probs[row][..., list(w)].sum(-1) for w in mods]
                if cfg.smooth_attentions:
                    found = [gaussian_smooth(a, cfg.kernel_size, cfg.sigma) for a in found]
                attrs.append(found)
            loss, min_tv = divide_bind_loss(s, attrs, step.index, cfg.tv)
            losses.append(loss)
            stats.append({"min_tv": min_tv})
        return Evaluation(torch.stack(losses), stats=stats)
