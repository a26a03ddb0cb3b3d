"""The test-time optimisation engine: cond-only partial forward, losses, gradient step on the latents,
iterative refinement; batched over images, each image with its own refinement decision."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field

import torch

from .checkpointing import checkpointing
from .controls.base import Evaluation, PreparedControl, Row, StepInfo, StepPlan
from .store import AttentionStore

logger = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """One denoising step of a run. ``loss`` is per image, summed over controls (None where no guidance ran);
    ``losses`` per control; ``refinement_iterations`` per image; ``seconds`` the whole step (guidance and
    denoising), ``guidance_seconds`` the guidance part. ``initial_loss`` is the loss before this step's updates,
    ``loss`` the one its regular update used (after refinement, where refinement ran). ``edits`` holds each
    attention-editing control's statistics for the step (e.g. Regulate's target quantile before/after)."""

    index: int
    timestep: float
    loss: list[float] | None = None
    initial_loss: list[float] | None = None
    losses: dict[str, list[float]] = field(default_factory=dict)
    refinement_iterations: list[int] | None = None
    updated: list[bool] | None = None
    seconds: float = 0.0
    guidance_seconds: float = 0.0
    edits: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class GuidancePass:
    """What one guidance pass gives: the leaf the losses are differentiable against, each control's per-image
    losses, and their weighted sum per image (what the update descends)."""

    leaf: torch.Tensor
    losses: dict[str, torch.Tensor]
    objective: torch.Tensor


@dataclass
class StepState:
    """One step's bookkeeping, owned by the engine: the controls acting and their plans, per control per image the
    latest evaluation's :class:`Row` and the loss of the evaluation that drove its last update, and per image the
    refinement iterations taken and whether its final update moved it."""

    acting: list[PreparedControl]
    plans: dict[str, StepPlan]
    rows: dict[str, list[Row]]
    final: dict[str, torch.Tensor]
    iterations: list[int]
    updated: list[bool]
    refining: dict[str, list[bool]] = field(default_factory=dict)

    def latent(self, c: PreparedControl) -> bool:
        """Whether ``c`` moves the latents by its own rule (the velocity rule takes one deferred update instead)."""
        return c.update_rule != "velocity"

    def record(self, name: str, images: list[int], evaluation: Evaluation) -> None:
        """Keep ``evaluation`` (rows = ``images``) as the images' latest: its rows and losses."""
        self.keep_rows(name, images, evaluation)
        for row, b in enumerate(images):
            self.final[name][b] = evaluation.loss[row].detach().float()

    def keep_rows(self, name: str, images: list[int], evaluation: Evaluation) -> None:
        """The rows the plans' tests read, one device sync for the losses."""
        values = evaluation.loss.detach().tolist()
        for row, b in enumerate(images):
            self.rows[name][b] = Row(values[row], evaluation.stats[row] if evaluation.stats else {})


class GuidanceEngine:
    def __init__(
        self,
        adapter,
        store: AttentionStore,
        controls: list[PreparedControl],
        cond: dict[str, torch.Tensor],
        timesteps: torch.Tensor,
        cross_attention_kwargs=None,
        checkpointing: bool = False,
        layer_names: dict | None = None,
    ):
        """``checkpointing``: in guidance passes, run the denoiser layers before the last captured block under
        gradient checkpointing (less memory, one extra forward of those layers per pass; same results)."""
        self.adapter = adapter
        self.store = store
        self.controls = controls
        self.cond = cond
        self.timesteps = timesteps
        # host copies, read once: float(timesteps[i]) at every pass would wait for the device each time
        self.timestep_values = [float(v) for v in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
        self.cross_attention_kwargs = cross_attention_kwargs
        self.map_keys = sorted({key for c in controls for key in c.map_keys()}, key=repr)
        self.layer_names = layer_names  # MapKey -> the layers it averages (None: every captured one at its grid)
        self.checkpointing = checkpointing
        self.deferred: dict[int, torch.Tensor] = {}
        # what each control carries from one evaluation of an image to the next: control -> image -> state
        self.carry: dict[str, dict[int, object]] = {c.name: {} for c in controls}

    def plans(self, i: int) -> dict[str, StepPlan]:
        return {c.name: c.plan(i) for c in self.controls}

    def needed_at(self, i: int) -> bool:
        return any(plan.acts for plan in self.plans(i).values())

    def evaluate(self, model_input: torch.Tensor, step: int, images: list[int] | None = None) -> GuidancePass:
        """One guidance pass, as the engine runs it: forward ``model_input`` (the denoiser's input at ``step``,
        i.e. ``scheduler.scale_model_input`` of the latents) for ``images`` (default all), return the leaf, each
        control's per-image loss and the weighted objective of the controls acting at ``step`` (all, when none
        acts). The capture processors must be installed (``Run.installed()``)."""
        plans = self.plans(step)
        acting = [c for c in self.controls if plans[c.name].acts] or list(self.controls)
        images = list(range(model_input.shape[0])) if images is None else list(images)
        leaf, evaluations = self._evaluate(model_input, images, step, acting)
        losses = {name: e.loss for name, e in evaluations.items()}
        objective = self._objective(losses, acting, plans, {c.name: [True] * len(images) for c in acting})
        return GuidancePass(leaf, losses, objective)

    def _evaluate(self, z: torch.Tensor, images: list[int], i: int, acting: list[PreparedControl]):
        """Forward the images' latents, evaluate the acting controls and commit what each carries forward:
        (leaf, {control: Evaluation})."""
        leaf = z[images].detach().requires_grad_(True)
        maps = self.forward_maps(leaf, i, images)
        info = StepInfo(index=i, timestep=self.timestep_values[i], total=len(self.timesteps))
        out = {}
        for c in acting:
            carried = self.carry[c.name]
            evaluation = c.evaluate(maps, images, info, [carried.get(b) for b in images])
            if evaluation.carry is not None:
                for b, state in zip(images, evaluation.carry):
                    carried[b] = state
            out[c.name] = evaluation
        return leaf, out

    def forward_maps(self, model_input: torch.Tensor, i: int, images: list[int]) -> dict:
        """The cond-branch forward of ``model_input`` (rows = ``images``) at step ``i``: the maps every control
        reads, differentiable w.r.t. whatever ``model_input`` was computed from."""
        self.store.reset()
        self.store.active = True
        try:
            cond = {key: value[images] for key, value in self.cond.items()}
            with self._memory_options():
                self.adapter.guidance_forward(model_input, self.timesteps[i], cond, self.cross_attention_kwargs)
        finally:
            self.store.active = False
        return {key: self._maps(key) for key in self.map_keys}

    def _maps(self, key) -> torch.Tensor:
        if self.layer_names is None:
            return self.store.maps(key.grid, key.kind)
        return self.store.maps_of(self.layer_names[key], key.grid, key.normalise)

    def _memory_options(self):
        if not self.checkpointing:
            return contextlib.nullcontext()
        return checkpointing(self.adapter.checkpoint_modules(self.store.last_layer), self.store)

    def _velocity(self, leaf, losses, i: int, n: int, state: StepState) -> None:
        """Velocity-rule controls: the gradient of sum_c alpha_c,i * L_c at this step's latents, kept to be
        subtracted from the next step's latents (FOCUS's velocity correction, as a deferred latent step)."""
        takes = {c.name: [not state.latent(c) and state.plans[c.name].update] * n for c in state.acting}
        if not any(any(v) for v in takes.values()):
            return
        objective = self._objective(losses, state.acting, state.plans, takes)
        nonzero = objective != 0
        if not bool(nonzero.any()):
            return
        (grad,) = torch.autograd.grad(objective, [leaf], grad_outputs=nonzero.to(objective.dtype), retain_graph=True)
        finite = torch.isfinite(grad.flatten(1)).all(1)
        if not bool(finite.all()):
            warnings.warn(f"non-finite gradient at step {i}: velocity update skipped for some images", stacklevel=3)
            grad = torch.where(finite.view(-1, *[1] * (grad.dim() - 1)), grad, torch.zeros_like(grad))
        self.deferred[i] = grad.detach()

    def take_deferred(self, i: int) -> torch.Tensor | None:
        """The velocity-rule shift computed at step i (to subtract from the latents after step i), once."""
        return self.deferred.pop(i, None)

    @staticmethod
    def _objective(losses, acting, plans: dict[str, StepPlan], takes: dict[str, list[bool]]) -> torch.Tensor:
        """One objective for the controls that take this update: per image, the sum of step_size_c(i) * loss_c over
        the controls whose ``takes[c][row]`` is set, so one backward serves them all."""
        total: torch.Tensor | int = 0
        for c in acting:
            mask = takes[c.name]
            if not any(mask):
                continue
            term = plans[c.name].step_size * losses[c.name]
            if not all(mask):
                term = torch.where(torch.tensor(mask, device=term.device), term, torch.zeros_like(term))
            total = total + term
        if isinstance(total, int):
            return torch.zeros(len(next(iter(losses.values()))), device=next(iter(losses.values())).device)
        return total

    def _step(self, z: torch.Tensor, images: list[int], leaf, objective, i: int) -> list[bool]:
        """z[b] <- z[b] - grad(objective_b) for the images whose objective is non-zero and whose gradient is finite."""
        nonzero = objective != 0
        move = nonzero.tolist()  # one device sync; the backward is skipped when no image moves
        if not any(move):
            return move
        # d(sum of the moving images' objectives)/d(leaf), without indexing by a mask (a sync on the device)
        (grad,) = torch.autograd.grad(objective, [leaf], grad_outputs=nonzero.to(objective.dtype))
        finite = torch.isfinite(grad.flatten(1)).all(1).tolist()
        for k, b in enumerate(images):
            if not move[k]:
                continue
            if not finite[k]:
                warnings.warn(f"non-finite gradient at step {i} for image {b}: update skipped", stacklevel=2)
                move[k] = False
                continue
            if z.dtype in (torch.float32, torch.float64):
                z[b] = leaf[k].detach() - grad[k]
            else:  # half precision: update in float32, store in the pipeline's dtype
                z[b] = (leaf[k].detach().float() - grad[k].float()).to(z.dtype)
        return move

    def _update(self, z, images: list[int], i: int, state: StepState, takes: dict[str, list[bool]]) -> list[bool]:
        """One guidance pass over ``images`` and the update of the controls that ``takes`` (rows = ``images``);
        the pass becomes the images' latest evaluation. Returns which images moved."""
        leaf, evaluations = self._evaluate(z, images, i, state.acting)
        losses = {name: e.loss for name, e in evaluations.items()}
        moved = self._step(z, images, leaf, self._objective(losses, state.acting, state.plans, takes), i)
        for name, evaluation in evaluations.items():
            state.record(name, images, evaluation)
        return moved

    def guide(self, latents: torch.Tensor, i: int) -> tuple[torch.Tensor, StepRecord]:
        """Guide the latents of step ``i``. Per image, every control takes the updates its own method takes alone:
        refinement iterations while its plan's test asks for them (at most its cap), then its final update if its
        plan's rule says so (A&E: always; Refocus: only while its stopping test still passes; others: their one
        update). Updates that several controls take at the same iteration share one forward and one backward."""
        start = time.perf_counter()
        record = StepRecord(index=i, timestep=self.timestep_values[i])
        plans = self.plans(i)
        acting = [c for c in self.controls if plans[c.name].acts]
        if not acting:
            return latents, record
        n = latents.shape[0]
        # Work in the model's input space z = c * x (see the adapter's input_scale): the same input, the same step.
        scale = self.adapter.input_scale(self.timesteps[i])
        z = latents.detach().clone() if scale == 1.0 else latents.detach() * scale
        with torch.enable_grad():
            state = self._first_pass(z, i, n, acting, plans, record)
            refine = [b for b in range(n) if state.iterations[b]]
            if refine:
                self._refine(z, refine, i, state)
        if scale != 1.0:
            out = latents.detach().clone()
            for b in range(n):
                if state.iterations[b] or state.updated[b]:  # images that did not move keep their latents bit for bit
                    out[b] = z[b] / scale
            z = out
        record.loss = _total(state.final, n)
        record.losses = {name: value.tolist() for name, value in state.final.items()}
        record.refinement_iterations = state.iterations
        record.updated = state.updated
        record.guidance_seconds = time.perf_counter() - start
        logger.info("step %d: loss %s, refinement %s", i, record.loss, state.iterations)
        return z, record

    def _first_pass(self, z, i: int, n: int, acting, plans, record: StepRecord) -> StepState:
        """The step's first evaluation of every image, its velocity-rule gradient, and one backward that serves
        both the images that just take their final update and the first refinement iteration of the others (their
        latents are unchanged, so it is the same pass)."""
        leaf, evaluations = self._evaluate(z, list(range(n)), i, acting)
        losses = {name: e.loss for name, e in evaluations.items()}
        state = StepState(
            acting,
            plans,
            {c.name: [Row(0.0)] * n for c in acting},
            {name: value.detach().float().clone() for name, value in losses.items()},
            [0] * n,
            [False] * n,
        )
        for name, evaluation in evaluations.items():  # the losses are already in ``final``
            state.keep_rows(name, list(range(n)), evaluation)
        record.initial_loss = _total(state.final, n)
        self._velocity(leaf, losses, i, n, state)
        for c in acting:
            test = plans[c.name].refine
            rows = state.rows[c.name]
            state.refining[c.name] = [state.latent(c) and test is not None and test(rows[b]) for b in range(n)]
        refine = [b for b in range(n) if any(r[b] for r in state.refining.values())]
        takes = {
            c.name: [
                state.latent(c)
                and (
                    state.refining[c.name][b]
                    if b in refine
                    else plans[c.name].takes_final(state.rows[c.name][b], False)
                )
                for b in range(n)
            ]
            for c in acting
        }
        moved = self._step(z, list(range(n)), leaf, self._objective(losses, acting, plans, takes), i)
        for b in range(n):
            if b in refine:
                state.iterations[b] = 1
            else:
                state.updated[b] = moved[b]
        return state

    def _refine(self, z, images: list[int], i: int, state: StepState) -> None:
        """Iterative refinement (A&E Sec. 3.3) of ``images``, whose first iteration was taken on the step's first
        pass. Control c takes iteration k + 1 if it took iteration k, k < its cap, and its test still asks for it
        on the evaluation that drove iteration k. When no control takes the next iteration of an image, each
        control's final-update rule is asked (on that same evaluation) and the image gets one more pass for the
        controls that take it."""
        refining = state.refining
        started = {name: list(flags) for name, flags in refining.items()}  # who took iteration 1, per image
        finals: dict[int, dict[str, bool]] = {}
        k = 1
        active = list(images)
        while active:
            going = []
            for b in active:
                for c in state.acting:
                    plan, row = state.plans[c.name], state.rows[c.name][b]
                    refining[c.name][b] = (
                        refining[c.name][b] and k < plan.max_refinement and plan.refine is not None and plan.refine(row)
                    )
                if any(r[b] for r in refining.values()):
                    going.append(b)
                else:  # this image's refinement ends: each control's final-update rule, on the latest evaluation
                    finals[b] = {
                        c.name: state.latent(c)
                        and state.plans[c.name].takes_final(state.rows[c.name][b], started[c.name][b])
                        for c in state.acting
                    }
            active = going
            if not active:
                break
            k += 1
            self._update(z, active, i, state, {c.name: [refining[c.name][b] for b in active] for c in state.acting})
            for b in active:
                state.iterations[b] = k
        last = [b for b in images if any(finals[b].values())]
        if last:
            moved = self._update(z, last, i, state, {c.name: [finals[b][c.name] for b in last] for c in state.acting})
            for k, b in enumerate(last):
                state.updated[b] = moved[k]


def _total(final: dict[str, torch.Tensor], n: int) -> list[float]:
    """Per image, the sum over controls, added in the same order as ``sum(value[b] for value in ...)``."""
    total: torch.Tensor | float = 0.0
    for value in final.values():
        total = total + value
    return total.tolist() if isinstance(total, torch.Tensor) else [float(total)] * n
