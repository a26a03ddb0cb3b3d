"""InitNO (Guo et al., CVPR 2024, arXiv:2404.04650): optimise the initial noise until the first step's attention is
good (every subject attended, subjects' self-attention apart), within a KL bound of N(0, I); then sample with
A&E-style guidance. Constants from the official code (xiefan-guo/initno,
``initno/pipelines/pipeline_sd_initno.py``, ``run_sd_initno.py``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .._lazy import torch
from ..errors import OptionError
from ..ops import gaussian_smooth
from .base import ControlContext, PreparedControl, register, subjects_field, window_stop
from .common import GuidanceOptions, TokenMaps, ae_step_sizes, count_field, scale_factor_field, scale_range_field
from .fields import POSITIVE, Range, option
from .vocabulary import Evaluation, MapKey, Row, StepInfo, StepPlan

logger = logging.getLogger(__name__)

# the KL projection repeats Adam steps on the KL alone until it is within the bound; this caps that inner loop
KL_STEPS_CAP = 1000

# -- the loss terms ----------------------------------------------------------------------------------------------


def cross_response(maps: torch.Tensor) -> torch.Tensor:
    """``max_s (1 - max_pixels C_s)``, clamped at 0: the weakest subject's peak (A&E's loss)."""
    return torch.clamp(1.0 - maps.flatten(1).amax(1), min=0.0).max()


def peak_self_maps(
    maps: torch.Tensor, self_attn: torch.Tensor, smooth: bool = True, kernel_size: int = 3, sigma: float = 0.5
) -> torch.Tensor:
    """For each subject of ``maps`` (subjects, rows, cols), the self-attention of its peak pixel over the key
    pixels (rows, cols), smoothed; ``self_attn``: (rows, cols, rows * cols), row-major keys."""
    rows, cols = maps.shape[1:]
    peaks = maps.detach().flatten(1).argmax(1).tolist()
    out = torch.stack([self_attn.reshape(rows * cols, rows, cols)[p] for p in peaks])
    return gaussian_smooth(out, kernel_size, sigma) if smooth else out


def self_conflict(self_maps: torch.Tensor) -> torch.Tensor:
    """Mean over subject pairs of ``sum min(S_a, S_b) / (sum (S_a + S_b) + 1e-6)``; 0 with fewer than two."""
    n = self_maps.shape[0]
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    if not pairs:
        return self_maps.new_zeros(())
    overlaps = [
        torch.minimum(self_maps[a], self_maps[b]).sum() / ((self_maps[a] + self_maps[b]).sum() + 1e-6) for a, b in pairs
    ]
    return torch.stack(overlaps).mean()


def otsu_level(values: list[int]) -> int:
    """OpenCV's Otsu threshold of integer levels: the level t maximising q1 q2 (mu1 - mu2)^2 with class 1 = levels
    <= t, the first on ties, skipping splits where a class is empty."""
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    levels = sorted(counts)
    total, mean = len(values), sum(values) / len(values)
    best, best_t, q1, s1 = -1.0, levels[0], 0, 0.0
    for t in levels:
        q1 += counts[t]
        s1 += t * counts[t]
        q2 = total - q1
        if q1 == 0 or q2 == 0:
            continue
        mu1, mu2 = s1 / q1, (mean * total - s1) / q2
        var = (q1 / total) * (q2 / total) * (mu1 - mu2) ** 2
        if var > best:
            best, best_t = var, t
    return best_t


def clean_term(m: torch.Tensor) -> torch.Tensor:
    """The official code's second-blob penalty: Otsu-threshold the map (levels ``trunc(255 m)``, foreground =
    levels >= the threshold), take the 4-connected component of the peak; if the largest value outside it exceeds
    the smallest inside it, that largest outside value, else 0."""
    rows, cols = m.shape
    levels = (m.detach() * 255).to(torch.int64).flatten().tolist()
    t = otsu_level(levels)
    fg = [[levels[r * cols + c] >= t for c in range(cols)] for r in range(rows)]
    start = int(m.detach().flatten().argmax())
    seen, stack = set(), [(start // cols, start % cols)]
    while stack:
        r, c = stack.pop()
        if (r, c) in seen or not (0 <= r < rows and 0 <= c < cols) or not fg[r][c]:
            continue
        seen.add((r, c))
        stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    inside = torch.zeros(rows, cols, dtype=m.dtype, device=m.device)
    for r, c in seen:
        inside[r, c] = 1
    fg_vals = m * inside + (1 - inside)
    bg_vals = m * (1 - inside)
    if float(bg_vals.max().detach()) > float(fg_vals.min().detach()):
        return bg_vals.max()
    return m.new_zeros(())


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, 1)) per element, averaged: ``mean(0.5 (e^lv + mu^2 - 1 - lv))``."""
    return (0.5 * (log_var.exp() + mean**2 - 1 - log_var)).mean()


# -- the options -------------------------------------------------------------------------------------------------


@register("initno", order=9)
@dataclass
class InitNO(GuidanceOptions):
    """InitNO: the initial noise ``z = eps * exp(l / 2) + mu`` with (mu, l) optimised by Adam on
    ``S_cross + S_self + clean_weight * S_clean`` at the first step, KL(N(mu, e^l) || N(0, I)) kept <= ``kl_bound``;
    then sampling with ``z <- z - alpha_i grad S_cross`` and refinement on the joint score at ``refinement_steps``.

    As in the official code, a refinement step starts refining when ``S_cross > cross_target`` or ``S_self >
    self_target`` (its ``> 0.2``), and the refinement, given the peak target ``1 - cross_target`` (its
    ``threshold=0.8``), continues while ``S_cross > max(0, 1 - (1 - cross_target))`` (its ``1.0 - threshold``:
    0.19999999999999996) or ``S_self > self_target``."""

    subjects: list = subjects_field("as for attend-excite.")
    optimise: bool = option(True, "run the noise optimisation (official: always).")
    rounds: int = count_field(
        5,
        "up to this many noises (the seed's, then fresh draws from the same generator), "
        "each optimised for round_steps Adam steps, until one succeeds (official: 5).",
        low=1,
    )
    round_steps: int = count_field(10, "Adam steps per round (official: 10).", low=1)
    final_steps: int = count_field(
        50,
        "when the best-scored round failed, the optimisation re-run from that "
        "round's noise for this many steps (official: 50).",
    )
    lr: float = option(1e-2, "Adam's learning rate (official: 1e-2).", range=POSITIVE, app=(0, 1e4))
    adam_eps: float = option(1e-3, "Adam's eps (official: 1e-3).", range=POSITIVE)
    kl_bound: float = option(
        1e-3, "after each step, Adam steps on the KL alone while KL > bound (official: 1e-3).", range=POSITIVE
    )
    cross_target: float = option(
        0.2,
        "success when S_cross < cross_target (and S_self < self_target); also the "
        "sampling refinement's target (official: 0.2).",
    )
    self_target: float = option(
        0.3, "success when S_self < self_target; also the sampling refinement's (official: 0.3)."
    )
    self_gate: float = option(
        0.5, "during the optimisation S_self counts only once S_cross <= self_gate (official: 0.5)."
    )
    clean_weight: float = option(
        1.0, "weight of the clean term (a second blob of a subject's map) in the optimisation (official: 1)."
    )
    guide: bool = option(
        True, "after the optimisation, sample with the A&E-style guidance below (official script: on)."
    )
    refinement_steps: tuple[int, ...] = option(
        (10, 20),
        "refinement at these steps while S_cross > cross_target or S_self > self_target (official: (10, 20)).",
        items=Range(0),
        unit="steps",
    )
    max_refinement_steps: int = count_field(20, "at most this many refinement iterations (official: 20).", app=(0, 50))
    sampling_clean_weight: float = option(
        0.1, "the refinement's score S_cross + S_self + 0.1 S_clean + 0.1 S_align: the weight of S_clean (official)."
    )
    align_weight: float = option(
        0.1,
        "the weight of S_align, the L1 distance of each subject's map to an "
        "exponential average of its earlier maps (official).",
    )
    align_decay: float = option(0.9, "that average's decay (official: 0.9).", range=Range(0, 1, open_high=True))
    scale_factor: float = scale_factor_field()
    scale_range: tuple[float, float] = scale_range_field()
    alignment_cache: str = option(
        "official",
        "when that average is updated. 'official': once per evaluation the official code makes; at a refinement "
        "step that refines, the official code evaluates the step's latents twice before the first refinement "
        "update (the step's evaluation, then refinement iteration 1's), while the engine reuses the first "
        "evaluation for iteration 1, so the average takes that evaluation's maps twice (0.81 avg + 0.19 C instead "
        "of 0.9 avg + 0.1 C). 'once': once per evaluation the engine makes (one update there).",
        choices=("official", "once"),
    )
    stop: int | float | None = window_stop(25, "guided steps start .. stop - 1 (official: 25).")

    def check(self) -> None:
        super().check()
        if not (self.optimise or self.guide):
            raise OptionError("InitNO with optimise=False and guide=False does nothing; enable one of them")

    def prepare(self, ctx: ControlContext) -> PreparedInitNO:
        return PreparedInitNO(self, ctx)


@dataclass
class Scores:
    """One image's InitNO scores (differentiable tensors)."""

    cross: torch.Tensor
    self_: torch.Tensor
    clean: torch.Tensor
    maps: torch.Tensor  # (subjects, rows, cols), for the alignment term


@dataclass
class Optimised:
    """One optimisation run: the noise it ends with, whether the scores met the targets, the scores of its last
    evaluation (before that evaluation's update, as the official code), the updates taken and the final KL."""

    noise: torch.Tensor
    success: bool = False
    cross: float = 1.0
    self_: float = 0.0
    steps: int = 0
    kl: float = 0.0

    @property
    def score(self) -> float:
        """The official selection score: ``S_cross + S_self``, +1 when S_self is 0 (gated or one subject)."""
        return self.cross + (self.self_ + 1.0 if self.self_ <= 1e-6 else self.self_)

    def summary(self) -> dict:
        return {
            "success": self.success,
            "score": self.score,
            "cross": self.cross,
            "self": self.self_,
            "steps": self.steps,
            "kl": self.kl,
        }


class PreparedInitNO(PreparedControl):
    """Carries per image ``(average, (step, evaluations))``: the alignment term's exponential average of its maps
    and how many evaluations of it were made at the latest step. Its evaluation reports ``cross``, ``self`` and
    ``first`` (1 at a step's first evaluation), which its refinement test reads."""

    kinds = ("cross", "self")

    def __init__(self, cfg: InitNO, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects), cfg, ctx)
        self.self_key = MapKey("self", self.resolution, cfg.block_tuple)
        ctx.select(self.self_key)  # the layers S_self reads exist
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)

    # -- scores -------------------------------------------------------------------------------------------------

    def scores(self, maps, images: list[int]) -> list[Scores]:
        cfg = self.cfg
        self_maps = maps[self.self_key]
        out = []
        for row, m in enumerate(self.maps.per_image(maps, images)):
            peaks = peak_self_maps(m, self_maps[row], cfg.smooth_attentions, cfg.kernel_size, cfg.sigma)
            clean = torch.stack([clean_term(s) for s in m]).sum()
            out.append(Scores(cross_response(m), self_conflict(peaks), clean, m))
        return out

    # -- the noise optimisation ---------------------------------------------------------------------------------

    def initial_noise(self, noise: torch.Tensor, search) -> tuple[torch.Tensor, list[dict] | None]:
        if not self.cfg.optimise:
            return noise, None
        chosen, reports = [], []
        for b in range(noise.shape[0]):
            z, report = self._search(noise[b : b + 1], b, search)
            chosen.append(z.to(noise.dtype))
            reports.append(report)
            logger.info("InitNO image %d: %s", b, report)
        return torch.cat(chosen), reports

    def _search(self, first: torch.Tensor, b: int, search) -> tuple[torch.Tensor, dict]:
        """The official rounds: optimise the seed's noise, then fresh draws, until one succeeds; keep the
        best-scored round's result if it succeeded, else re-optimise its noise for ``final_steps``."""
        cfg = self.cfg
        pool: list[tuple[Optimised, torch.Tensor]] = []
        for r in range(cfg.rounds):
            eps = first if r == 0 else search.draw(b)
            pool.append((self._optimise(eps, b, search, cfg.round_steps), eps))
            if pool[-1][0].success:
                break
        r = min(range(len(pool)), key=lambda k: (pool[k][0].score, k))
        best, eps = pool[r]
        report = {"rounds": len(pool), "best_round": r, **best.summary()}
        if not best.success and cfg.final_steps > 0:
            best = self._optimise(eps, b, search, cfg.final_steps)
            report["final"] = best.summary()
        return best.noise, report

    def _optimise(self, eps: torch.Tensor, b: int, search, steps: int) -> Optimised:
        """``fn_initno``: Adam on (mu, log-variance) of ``z = eps * exp(l / 2) + mu``; success is tested before each
        update; after each update, Adam steps on the KL alone while it exceeds the bound."""
        cfg = self.cfg
        eps = eps.detach().float()
        mean = torch.zeros_like(eps, requires_grad=True)
        log_var = torch.zeros_like(eps, requires_grad=True)
        opt = torch.optim.Adam([log_var, mean], lr=cfg.lr, eps=cfg.adam_eps)
        out = Optimised(noise=eps)
        with torch.enable_grad():
            for _ in range(steps):
                z = eps * (log_var / 2).exp() + mean
                s = self.scores(search.maps(z, b), [b])[0]
                out.cross = float(s.cross.detach())
                self_term = s.self_ * 0.0 if out.cross > cfg.self_gate else s.self_
                out.self_ = float(self_term.detach())
                if out.cross < cfg.cross_target and out.self_ < cfg.self_target:
                    out.success = True
                    break
                opt.zero_grad()
                (s.cross + self_term + cfg.clean_weight * s.clean).backward()
                opt.step()
                out.steps += 1
                for _ in range(KL_STEPS_CAP):
                    kl = gaussian_kl(mean, log_var)
                    if float(kl.detach()) <= cfg.kl_bound:
                        break
                    opt.zero_grad()
                    kl.backward()
                    opt.step()
            out.kl = float(gaussian_kl(mean, log_var).detach())
        out.noise = (eps * (log_var / 2).exp() + mean).detach()
        return out

    # -- sampling -----------------------------------------------------------------------------------------------

    def _refines_at(self, step: int) -> bool:
        return self.cfg.guide and self.in_window(step) and step in self.cfg.refinement_steps

    def plan(self, step: int) -> StepPlan:
        def test(row: Row) -> bool:
            """On the step's first evaluation the official entry test (``S_cross > 0.2``), after it the official
            loop's test (``S_cross > 1 - 0.8``); the engine asks after iteration 1 on that same first evaluation,
            whose scores passed the entry test and so pass the loop's (0.2 > 1 - 0.8): the same decisions as the
            official code."""
            return self._refines(row.stats["cross"], row.stats["self"], row.stats["first"] == 1.0)

        refine = test if self._refines_at(step) else None
        update = self.cfg.guide and self.in_window(step)
        return self.make_plan(step, self.step_sizes[step], update, refine, self.cfg.max_refinement_steps)

    def _starts_refining(self, step: int, cross: float, self_: float) -> bool:
        """With ``alignment_cache="official"``: the engine will refine this image at this step (its first test)."""
        return (
            self.cfg.alignment_cache == "official"
            and self.update_rule != "velocity"
            and self._refines_at(step)
            and self._refines(cross, self_, True)
        )

    def _refines(self, cross: float, self_: float, first: bool) -> bool:
        cfg = self.cfg
        target = cfg.cross_target if first else max(0.0, 1.0 - (1.0 - cfg.cross_target))
        return cross > target or self_ > cfg.self_target

    def evaluate(self, maps, images: list[int], step: StepInfo, carry: list) -> Evaluation:
        """``S_cross``; at the refinement steps the joint score with the clean and alignment terms. Each evaluation
        updates the alignment average (twice at the first evaluation of a step that starts refining, with
        ``alignment_cache="official"``)."""
        cfg = self.cfg
        losses, stats, carried = [], [], []
        for s, state in zip(self.scores(maps, images), carry):
            average, (seen, count) = state if state is not None else (None, (None, 0))
            cross, self_ = float(s.cross.detach()), float(s.self_.detach())
            count = count + 1 if seen == step.index else 1
            # the official refinement's iteration 1 evaluates the step's latents again: a second update, same maps
            updates = 2 if count == 1 and self._starts_refining(step.index, cross, self_) else 1
            current = s.maps.detach()
            for _ in range(updates):  # the official rule: cache * alpha + maps * (1 - alpha), the first maps as is
                average = current if average is None else cfg.align_decay * average + (1 - cfg.align_decay) * current
            assert average is not None  # set above
            if step.index in cfg.refinement_steps:
                align = (s.maps - average).abs().flatten(1).mean(1).sum()
                losses.append(s.cross + s.self_ + cfg.sampling_clean_weight * s.clean + cfg.align_weight * align)
            else:
                losses.append(s.cross)
            stats.append({"cross": cross, "self": self_, "first": 1.0 if count == 1 else 0.0})
            carried.append((average, (step.index, count)))
        return Evaluation(torch.stack(losses), stats=stats, carry=carried)
