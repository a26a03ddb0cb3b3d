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
from .controls.base import PreparedControl, StepInfo
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
        self.active = list(controls)
        self.checkpointing = checkpointing
        self.deferred: dict[int, torch.Tensor] = {}

    def needed_at(self, i: int) -> bool:
        return any(c.updates_at(i) or c.refines_at(i) for c in self.controls)

    def evaluate(self, model_input: torch.Tensor, step: int, images: list[int] | None = None) -> GuidancePass:
        """One guidance pass, as the engine runs it: forward ``model_input`` (the denoiser's input at ``step``,
        i.e. ``scheduler.scale_model_input`` of the latents) for ``images`` (default all), return the leaf, each
        control's per-image loss and the weighted objective of the controls active at ``step``. The capture
        processors must be installed (``Run.installed()``)."""
        self.active = [c for c in self.controls if c.updates_at(step) or c.refines_at(step)] or list(self.controls)
        images = list(range(model_input.shape[0])) if images is None else list(images)
        leaf, losses = self._evaluate(model_input, images, step)
        objective = self._objective(losses, step, {c.name: [True] * len(images) for c in self.active})
        return GuidancePass(leaf, losses, objective)

    def _evaluate(self, z: torch.Tensor, images: list[int], i: int):
        """Forward the images' latents, return (leaf, {control: losses (n,)})."""
        leaf = z[images].detach().requires_grad_(True)
        maps = self.forward_maps(leaf, i, images)
        info = StepInfo(index=i, timestep=self.timestep_values[i], total=len(self.timesteps))
        return leaf, {c.name: c.loss(maps, images, info) for c in self.active}

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

    @staticmethod
    def step_size(control, i: int) -> float:
        """The control's step at step i: its own (latent rule) or the velocity rule's alpha_i."""
        if control.update_rule == "velocity":
            return float(control.velocity_sizes[i])
        return control.step_size(i)

    def _velocity(self, leaf, losses, i: int, n: int) -> None:
        """Velocity-rule controls: the gradient of sum_c alpha_c,i * L_c at this step's latents, kept to be
        subtracted from the next step's latents (FOCUS's velocity correction, as a deferred latent step)."""
        takes = {c.name: [c.update_rule == "velocity" and c.updates_at(i)] * n for c in self.active}
        if not any(any(v) for v in takes.values()):
            return
        objective = self._objective(losses, i, takes)
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

    def _objective(self, losses, i: int, takes: dict[str, list[bool]]) -> torch.Tensor:
        """One objective for the controls that take this update: per image, the sum of step_size_c(i) * loss_c over
        the controls whose ``takes[c][row]`` is set, so one backward serves them all."""
        total = 0
        for c in self.active:
            mask = takes[c.name]
            if not any(mask):
                continue
            term = self.step_size(c, i) * losses[c.name]
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

    def guide(self, latents: torch.Tensor, i: int) -> tuple[torch.Tensor, StepRecord]:
        """Guide the latents of step ``i``. Per image, every control takes the updates its own method takes alone:
        refinement iterations while its own test asks for them (at most its cap), then its final update if its
        rule says so (A&E: always; Refocus: only while its stopping test still passes; others: their one update).
        Updates that several controls take at the same iteration share one forward and one backward."""
        start = time.perf_counter()
        record = StepRecord(index=i, timestep=self.timestep_values[i])
        if not self.needed_at(i):
            return latents, record
        n = latents.shape[0]
        # Work in the model's input space z = c * x (see the adapter's input_scale): the same input, the same step.
        scale = self.adapter.input_scale(self.timesteps[i])
        z = latents.detach().clone() if scale == 1.0 else latents.detach() * scale
        self.active = [c for c in self.controls if c.updates_at(i) or c.refines_at(i)]
        with torch.enable_grad():
            leaf, losses = self._evaluate(z, list(range(n)), i)
            final = {name: value.detach().float().clone() for name, value in losses.items()}
            host = _host(final)
            record.initial_loss = _total(final, n)
            self._velocity(leaf, losses, i, n)
            latent = {c.name: c.update_rule != "velocity" for c in self.active}
            refining = {
                c.name: [latent[c.name] and c.refines_at(i) and c.wants_refinement(i, b, host[c.name][b])
                         for b in range(n)]
                for c in self.active
            }  # fmt: skip
            refine = [b for b in range(n) if any(r[b] for r in refining.values())]
            # One backward on this pass serves both the images that just take their final update and the first
            # refinement iteration of the others (their latents are unchanged, so it is the same pass).
            takes = {
                c.name: [latent[c.name] and (refining[c.name][b] if b in refine else
                                             c.final_update(i, b, False, host[c.name][b])) for b in range(n)]
                for c in self.active
            }  # fmt: skip
            iterations = [1 if b in refine else 0 for b in range(n)]
            updated = [False] * n
            moved = self._step(z, list(range(n)), leaf, self._objective(losses, i, takes), i)
            for b in range(n):
                if b not in refine:
                    updated[b] = moved[b]
            del leaf, losses
            if refine:
                self._refine(z, refine, i, iterations, final, updated, refining, host)
        if scale != 1.0:
            out = latents.detach().clone()
            for b in range(n):
                if iterations[b] or updated[b]:  # images that did not move keep their latents bit for bit
                    out[b] = z[b] / scale
            z = out
        record.loss = _total(final, n)
        record.losses = {name: value.tolist() for name, value in final.items()}
        record.refinement_iterations = iterations
        record.updated = updated
        record.guidance_seconds = time.perf_counter() - start
        logger.info("step %d: loss %s, refinement %s", i, record.loss, iterations)
        return z, record

    def _refine(self, z, images, i, iterations, final, updated, refining, host) -> None:
        """Iterative refinement (A&E Sec. 3.3) of ``images``, whose first iteration was taken on the step's first
        pass. Control c takes iteration k + 1 if it took iteration k, k < its cap, and its test still asks for it
        on the evaluation that drove iteration k. When no control takes the next iteration of an image, each
        control's final update rule is asked (on that same evaluation) and the image gets one more pass for the
        controls that take it."""
        started = {name: list(flags) for name, flags in refining.items()}  # who took iteration 1, per image
        finals: dict[int, dict[str, bool]] = {}
        k = 1
        active = list(images)
        while active:
            rows = {}
            for b in active:
                for c in self.active:
                    refining[c.name][b] = (
                        refining[c.name][b] and k < c.max_refinement(i) and c.wants_refinement(i, b, host[c.name][b])
                    )
                if any(r[b] for r in refining.values()):
                    rows[b] = len(rows)
                else:  # this image's refinement ends: each control's final-update rule, on the latest evaluation
                    finals[b] = {
                        c.name: c.update_rule != "velocity"
                        and c.final_update(i, b, started[c.name][b], host[c.name][b])
                        for c in self.active
                    }
            active = list(rows)
            if not active:
                break
            k += 1
            leaf, losses = self._evaluate(z, active, i)
            takes = {c.name: [refining[c.name][b] for b in active] for c in self.active}
            self._step(z, active, leaf, self._objective(losses, i, takes), i)
            values = _host(losses)
            for b, row in rows.items():
                iterations[b] = k
                for name, value in losses.items():
                    final[name][b] = value[row].detach().float()
                    host[name][b] = values[name][row]
            del leaf, losses
        last = [b for b in images if any(finals[b].values())]
        if not last:
            return
        leaf, losses = self._evaluate(z, last, i)
        takes = {c.name: [finals[b][c.name] for b in last] for c in self.active}
        moved = self._step(z, last, leaf, self._objective(losses, i, takes), i)
        for row, b in enumerate(last):
            updated[b] = moved[row]
            for name, value in losses.items():
                final[name][b] = value[row].detach().float()


def _host(losses: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Each control's per-image losses as Python floats: one device sync per control, not one per image."""
    return {name: value.detach().tolist() for name, value in losses.items()}


def _total(final: dict[str, torch.Tensor], n: int) -> list[float]:
    """Per image, the sum over controls, added in the same order as ``sum(value[b] for value in ...)``."""
    total = 0
    for value in final.values():
        total = total + value
    return total.tolist() if torch.is_tensor(total) else [float(total)] * n
