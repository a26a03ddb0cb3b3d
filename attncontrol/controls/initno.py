"""InitNO (Guo et al., CVPR 2024): optimise the initial noise until the first step's attention is good (every
subject attended, subjects' self-attention apart), within a KL bound of N(0, I); then sample with A&E-style
guidance. Constants from the official code (xiefan-guo/initno, ``initno/pipelines/pipeline_sd_initno.py``,
``run_sd_initno.py``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError
from ..limits import check_count
from ..losses.initno import clean_term, cross_response, gaussian_kl, peak_self_maps, self_conflict
from ..store import MapKey
from .base import ControlContext, PreparedControl, StepInfo, with_aliases
from .common import GuidanceOptions, TokenMaps, ae_step_sizes, validate_step_schedule
from .options import check_fields

logger = logging.getLogger(__name__)

# the KL projection repeats Adam steps on the KL alone until it is within the bound; this caps that inner loop
KL_STEPS_CAP = 1000


@with_aliases
@dataclass
class InitNO(GuidanceOptions):
    """InitNO: the initial noise ``z = eps * exp(l / 2) + mu`` with (mu, l) optimised by Adam on
    ``S_cross + S_self + clean_weight * S_clean`` at the first step, KL(N(mu, e^l) || N(0, I)) kept <= ``kl_bound``;
    then sampling with ``z <- z - alpha_i grad S_cross`` and refinement on the joint score at ``refinement_steps``.

    Args:
        subjects: as for :class:`AttendExcite`.
        optimise: run the noise optimisation (official: always).
        rounds, round_steps: up to ``rounds`` noises (the seed's, then fresh draws from the same generator), each
            optimised for ``round_steps`` Adam steps, until one succeeds (official: 5, 10; each at most 1000).
        final_steps: when the best-scored round failed, the optimisation re-run from that round's noise for this
            many steps (official: 50; at most 1000).
        lr, adam_eps: Adam's learning rate and eps (official: 1e-2, 1e-3).
        kl_bound: after each step, Adam steps on the KL alone while KL > bound (official: 1e-3).
        cross_target, self_target: success when ``S_cross < cross_target`` and ``S_self < self_target``; also the
            sampling refinement's targets (official: 0.2, 0.3). As in the official code, a refinement step starts
            refining when ``S_cross > cross_target`` or ``S_self > self_target`` (its ``> 0.2``), and the refinement,
            given the peak target ``1 - cross_target`` (its ``threshold=0.8``), continues while ``S_cross >
            max(0, 1 - (1 - cross_target))`` (its ``1.0 - threshold``: 0.19999999999999996) or ``S_self >
            self_target``.
        self_gate: during the optimisation S_self counts only once ``S_cross <= self_gate`` (official: 0.5).
        clean_weight: weight of the clean term (a second blob of a subject's map) in the optimisation (official: 1).
        guide: after the optimisation, sample with the A&E-style guidance below (official script: on).
        stop (alias ``max_iter_to_alter``): guided steps ``start .. stop - 1`` (official: 25).
        refinement_steps, max_refinement_steps: refinement at these steps while ``S_cross > cross_target`` or
            ``S_self > self_target``, at most this many iterations (official: (10, 20), 20; at most 1000).
        sampling_clean_weight, align_weight, align_decay: the refinement's score
            ``S_cross + S_self + 0.1 S_clean + 0.1 S_align``, S_align the L1 distance of each subject's map to an
            exponential average (decay 0.9) of its earlier maps (official values).
        alignment_cache: when that average is updated. ``"official"`` (default): once per evaluation the official
            code makes; at a refinement step that refines, the official code evaluates the step's latents twice
            before the first refinement update (the step's evaluation, then refinement iteration 1's), while the
            engine reuses the first evaluation for iteration 1, so the average takes that evaluation's maps twice
            (the second evaluation of the same latents gives the same maps): ``0.81 avg + 0.19 C`` instead of
            ``0.9 avg + 0.1 C``. ``"once"``: once per evaluation the engine makes (one update there).
        scale_factor, scale_range: step size ``scale_factor * sqrt(linspace(*scale_range, steps)[i])`` (20, (1, 0.5)).
        attn_res, kernel_size, sigma, smooth_attentions, exclude_eot, softmax_scale, blocks, normalise, recipe:
            the maps (:class:`~attncontrol.controls.common.MapOptions`); self-attention at the same resolution.
        update, velocity_scale: how the latents move (:class:`~attncontrol.controls.common.GuidanceOptions`).
    """

    method: ClassVar[str] = "initno"
    aliases: ClassVar[dict[str, str]] = {"max_iter_to_alter": "stop"}

    subjects: list = field(default_factory=list)
    optimise: bool = True
    rounds: int = 5
    round_steps: int = 10
    final_steps: int = 50
    lr: float = 1e-2
    adam_eps: float = 1e-3
    kl_bound: float = 1e-3
    cross_target: float = 0.2
    self_target: float = 0.3
    self_gate: float = 0.5
    clean_weight: float = 1.0
    guide: bool = True
    refinement_steps: tuple[int, ...] = (10, 20)
    max_refinement_steps: int = 20
    sampling_clean_weight: float = 0.1
    align_weight: float = 0.1
    align_decay: float = 0.9
    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    alignment_cache: str = "official"
    stop: int | float | None = field(default=25, kw_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate_subjects()
        self.validate_window()
        validate_step_schedule(self)
        for name in ("rounds", "round_steps"):
            check_count(getattr(self, name), name, low=1)
        for name in ("final_steps", "max_refinement_steps"):
            check_count(getattr(self, name), name)
        for name in ("lr", "adam_eps", "kl_bound"):
            if not getattr(self, name) > 0:
                raise OptionError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.align_decay < 1.0:
            raise OptionError(f"align_decay must be in [0, 1), got {self.align_decay}")
        if self.alignment_cache not in ("official", "once"):
            raise OptionError(f"alignment_cache must be 'official' or 'once', got {self.alignment_cache!r}")
        if not (self.optimise or self.guide):
            raise OptionError("InitNO with optimise=False and guide=False does nothing; enable one of them")
        self.validate_map_options()
        self.validate_update()

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
        return {"success": self.success, "score": self.score, "cross": self.cross, "self": self.self_,
                "steps": self.steps, "kl": self.kl}  # fmt: skip


class PreparedInitNO(PreparedControl):
    kinds = ("cross", "self")

    def __init__(self, cfg: InitNO, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects), cfg, ctx)
        self.self_key = MapKey("self", self.resolution, cfg.blocks)
        ctx.select(self.self_key)  # the layers S_self reads exist
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)
        self.max_refinement_steps = cfg.max_refinement_steps
        self._latest: dict[int, tuple[float, float]] = {}
        self._average: dict[int, torch.Tensor] = {}
        self._evaluations: dict[int, tuple[int, int]] = {}  # per image: (step, evaluations of it at that step)
        self.noise_report = []

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

    def initial_noise(self, noise: torch.Tensor, search) -> torch.Tensor:
        if not self.cfg.optimise:
            return noise
        chosen = []
        for b in range(noise.shape[0]):
            z, report = self._search(noise[b : b + 1], b, search)
            chosen.append(z.to(noise.dtype))
            self.noise_report.append(report)
            logger.info("InitNO image %d: %s", b, report)
        return torch.cat(chosen)

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

    def updates_at(self, step: int) -> bool:
        return self.cfg.guide and self.in_window(step)

    def refine_target(self, step: int) -> float | None:
        return self.cfg.cross_target if step in self.cfg.refinement_steps and self.updates_at(step) else None

    def wants_refinement(self, step: int, image: int, loss: float) -> bool:
        """On the step's first evaluation the official entry test (``S_cross > 0.2``), after it the official loop's
        test (``S_cross > 1 - 0.8``); the engine asks after iteration 1 on that same first evaluation, whose scores
        passed the entry test and so pass the loop's (0.2 > 1 - 0.8): the same decisions as the official code."""
        if self.refine_target(step) is None:
            return False
        cross, self_ = self._latest.get(image, (1.0, 1.0))
        return self._refines(cross, self_, self._evaluations.get(image) == (step, 1))

    def _starts_refining(self, step: int, cross: float, self_: float) -> bool:
        """With ``alignment_cache="official"``: the engine will refine this image at this step (its first test)."""
        return (
            self.cfg.alignment_cache == "official"
            and self.update_rule != "velocity"
            and self.refine_target(step) is not None
            and self._refines(cross, self_, True)
        )

    def _refines(self, cross: float, self_: float, first: bool) -> bool:
        cfg = self.cfg
        target = cfg.cross_target if first else max(0.0, 1.0 - (1.0 - cfg.cross_target))
        return cross > target or self_ > cfg.self_target

    def step_size(self, step: int) -> float:
        return float(self.step_sizes[step])

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        """``S_cross``; at the refinement steps the joint score with the clean and alignment terms. Each call is one
        evaluation: it updates the alignment average (twice at the first evaluation of a step that starts
        refining, with ``alignment_cache="official"``)."""
        cfg = self.cfg
        losses = []
        for b, s in zip(images, self.scores(maps, images)):
            cross, self_ = float(s.cross.detach()), float(s.self_.detach())
            self._latest[b] = (cross, self_)
            seen, count = self._evaluations.get(b, (None, 0))
            count = count + 1 if seen == step.index else 1
            self._evaluations[b] = (step.index, count)
            # the official refinement's iteration 1 evaluates the step's latents again: a second update, same maps
            updates = 2 if count == 1 and self._starts_refining(step.index, cross, self_) else 1
            current = s.maps.detach()
            average = self._average.get(b)
            for _ in range(updates):  # the official rule: cache * alpha + maps * (1 - alpha), the first maps as is
                average = current if average is None else cfg.align_decay * average + (1 - cfg.align_decay) * current
            self._average[b] = average
            if step.index in cfg.refinement_steps:
                align = (s.maps - average).abs().flatten(1).mean(1).sum()
                losses.append(s.cross + s.self_ + cfg.sampling_clean_weight * s.clean + cfg.align_weight * align)
            else:
                losses.append(s.cross)
        return torch.stack(losses)
