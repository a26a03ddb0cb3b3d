"""CONFORM (Meral et al., CVPR 2024, arXiv:2312.06059): a contrastive objective over attention maps, each subject's
tokens (its attributes and its noun) pulled together and different subjects pushed apart. Constants from the
official code and notebook (gemlab-vt/CONFORM: ``pipeline_conform.py``, ``notebook.ipynb``)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
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
)
from .fields import POSITIVE, Range, option
from .vocabulary import Evaluation, StepInfo, StepPlan, loss_above

# -- the loss ----------------------------------------------------------------------------------------------------


def nt_xent(embeddings: torch.Tensor, labels: list[int], temperature: float = 0.5) -> torch.Tensor:
    """Mean over ordered positive pairs (x, y) (same label, x != y) of
    ``-log(exp(s_xy / t) / (exp(s_xy / t) + sum_{n: label n != label x} exp(s_xn / t)))``, s the cosine
    similarity; other positives are not in the denominator. 0 when no pair shares a label."""
    e = embeddings.flatten(1)
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (e @ e.T) / temperature
    lab = torch.tensor(labels, device=e.device)
    same = lab[:, None] == lab[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=e.device)
    positive = same & ~eye
    if not bool(positive.any()):
        return sim.new_zeros(())
    negatives = torch.where(~same, sim.exp(), torch.zeros_like(sim)).sum(1, keepdim=True)  # per anchor x
    pos = sim.exp()
    terms = -torch.log(pos / (pos + negatives) + 1.2e-38)
    return terms[positive].mean()


# -- the options -------------------------------------------------------------------------------------------------


@register("conform", order=6)
@dataclass
class Conform(GuidanceOptions):
    """CONFORM: NT-Xent over the subjects' token maps (``z <- z - alpha_i * grad L``)."""

    subjects: list = subjects_field(
        "each subject is one group of positives: a noun, or a phrase ('red car': red and car)."
    )
    bindings: dict[str, tuple[str, ...]] = bindings_field(
        "more attributes per noun, {'car': ['red']}, joining its group."
    )
    temperature: float = option(0.5, "of the NT-Xent loss (official: 0.5).", range=POSITIVE)
    token_softmax: bool = option(
        False,
        "x softmax_scale softmax over the tokens before taking each token's map "
        "(official pipeline default True; the official notebook, whose settings we follow, "
        "False: raw averaged attention).",
    )
    previous_maps: bool = option(
        True, "each token's map of the previous step joins its group as a constant positive (official)."
    )
    refinement_steps: tuple[int, ...] = option(
        (0, 10, 20),
        "at these steps, exactly refinement_iterations extra updates (official: 0, 10, 20; no threshold).",
        items=Range(0),
        unit="steps",
    )
    refinement_iterations: int = count_field(20, "the extra updates at each refinement step (official: 20).")
    scale_factor: float = scale_factor_field()
    scale_range: tuple[float, float] = scale_range_field()
    stop: int | float | None = window_stop(
        30, "updates at steps start .. stop - 1 (official notebook 30; the pipeline's default 25)."
    )

    def prepare(self, ctx: ControlContext) -> PreparedConform:
        return PreparedConform(self, ctx)


# -- the step plan and the evaluation ----------------------------------------------------------------------------


class PreparedConform(PreparedControl):
    """Carries per image ``((step, maps), previous maps)``: its tokens' maps at the latest step it evaluated, and
    at the step before it (the constant positives)."""

    def __init__(self, cfg: Conform, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        groups = binding_groups(ctx, cfg.subjects, dict(cfg.bindings))
        # per image: the tokens (all pieces of every word) and their group labels
        self.tokens = [[p for mods, noun in g for w in (*mods, noun) for p in w] for g in groups]
        self.labels = [[k for k, (mods, noun) in enumerate(g) for w in (*mods, noun) for _ in w] for g in groups]
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects, positions=[[tuple(t)] for t in self.tokens]), cfg, ctx)
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)

    def plan(self, step: int) -> StepPlan:
        # exactly refinement_iterations extra updates: a test that always asks for more
        refines = step in self.cfg.refinement_steps and self.in_window(step)
        refine = loss_above(float("-inf")) if refines else None
        return self.make_plan(step, self.step_sizes[step], refine=refine, max_refinement=self.cfg.refinement_iterations)

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

    def evaluate(self, maps, images: list[int], step: StepInfo, carry: list) -> Evaluation:
        losses, carried = [], []
        for b, e, state in zip(images, self._embeddings(maps, images), carry):
            latest, previous = state if state is not None else (None, None)
            if latest is not None and latest[0] < step.index:
                previous = latest[1]
            labels = list(self.labels[b])
            if self.cfg.previous_maps and previous is not None:
                e = torch.cat([e, previous])
                labels = labels + labels
            losses.append(nt_xent(e, labels, self.cfg.temperature))
            carried.append(((step.index, e[: len(self.labels[b])].detach()), previous))
        return Evaluation(torch.stack(losses), carry=carried)
