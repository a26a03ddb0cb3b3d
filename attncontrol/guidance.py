"""The test-time optimisation engine: cond-only partial forward, losses, gradient step on the latents,
iterative refinement; batched over images, each image with its own refinement decision."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field

import torch

from .controls.base import PreparedControl, StepInfo
from .perf import checkpointing
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
    ):
        """``checkpointing``: in guidance passes, run the UNet layers before the last captured block under
        gradient checkpointing (less memory, one extra forward of those layers per pass; same results)."""
        self.adapter = adapter
        self.store = store
        self.controls = controls
        self.cond = cond
        self.timesteps = timesteps
        # host copies, read once: float(timesteps[i]) at every pass would wait for the device each time
        self.timestep_values = [float(v) for v in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
        self.cross_attention_kwargs = cross_attention_kwargs
        self.map_keys = sorted({(kind, c.resolution) for c in controls for kind in c.kinds})
        self.active = list(controls)
        self.checkpointing = checkpointing

    def needed_at(self, i: int) -> bool:
        return any(c.updates_at(i) or c.refines_at(i) for c in self.controls)

    def _evaluate(self, z: torch.Tensor, images: list[int], i: int):
        """Forward the images' latents, return (leaf, objective (n,), {control: losses (n,)})."""
        t = self.timesteps[i]
        leaf = z[images].detach().requires_grad_(True)
        self.store.reset()
        self.store.active = True
        try:
            cond = {key: value[images] for key, value in self.cond.items()}
            with self._memory_options():
                self.adapter.guidance_forward(leaf, t, cond, self.cross_attention_kwargs)
        finally:
            self.store.active = False
        maps = {key: self.store.maps(key[1], key[0]) for key in self.map_keys}
        info = StepInfo(index=i, timestep=self.timestep_values[i], total=len(self.timesteps))
        losses = {c.name: c.loss(maps, images, info) for c in self.active}
        return leaf, self._objective(losses, i, self.active), losses

    def _memory_options(self):
        if not self.checkpointing:
            return contextlib.nullcontext()
        return checkpointing(self.adapter.checkpoint_modules(self.store.last_layer), self.store)

    @staticmethod
    def _objective(losses, i: int, controls) -> torch.Tensor:
        """One objective for all controls: sum of step_size_c(i) * loss_c, so one backward serves them all."""
        return sum(c.step_size(i) * losses[c.name] for c in controls)

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
        start = time.perf_counter()
        record = StepRecord(index=i, timestep=self.timestep_values[i])
        if not self.needed_at(i):
            return latents, record
        n = latents.shape[0]
        # Work in the model's input space z = c * x (see the adapter's input_scale): the same input, the same step.
        scale = self.adapter.input_scale(self.timesteps[i])
        z = latents.detach().clone() if scale == 1.0 else latents.detach() * scale
        self.active = [c for c in self.controls if c.updates_at(i) or c.refines_at(i)]
        updating = [c for c in self.active if c.updates_at(i)]
        with torch.enable_grad():
            leaf, objective_all, losses = self._evaluate(z, list(range(n)), i)
            final = {name: value.detach().float().clone() for name, value in losses.items()}
            host = _host(final)
            record.initial_loss = _total(final, n)
            refine = [b for b in range(n) if self._wants_refinement(host, b, b, i)]
            iterations = [0] * n
            updated = [False] * n
            # One backward on this pass serves both the images that just take their regular update and the
            # first refinement iteration of the others (their latents are unchanged, so it is the same pass).
            if updating or refine:
                objective_update = self._objective(losses, i, updating) if updating else torch.zeros_like(objective_all)
                pick = torch.tensor([b in refine for b in range(n)], device=objective_all.device)
                objective = torch.where(pick, objective_all, objective_update)
                moved = self._step(z, list(range(n)), leaf, objective, i)
                for b in range(n):
                    if b in refine:
                        iterations[b] = 1
                    else:
                        updated[b] = moved[b]
            del leaf, objective_all, losses
            if refine:
                self._refine(z, refine, i, iterations, final, updated, bool(updating))
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

    def _wants_refinement(self, host_losses: dict[str, list[float]], row: int, image: int, i: int) -> bool:
        return any(c.refines_at(i) and c.wants_refinement(i, image, host_losses[c.name][row]) for c in self.active)

    def _refine(self, z, images, i, iterations, final, updated, update: bool) -> None:
        """Iterative refinement (A&E Sec. 3.3): step while a control asks for it, then one more pass whose loss
        drives the step's regular update. The first iteration was already taken on the step's first pass."""
        limit = max(c.max_refinement(i) for c in self.active if c.refines_at(i))
        host = _host(final)
        active = [b for b in images if limit > 1 and self._wants_refinement(host, b, b, i)]
        k = 1
        while active:
            k += 1
            leaf, objective, losses = self._evaluate(z, active, i)
            self._step(z, active, leaf, objective, i)
            for row, b in enumerate(active):
                iterations[b] = k
                for name, value in losses.items():
                    final[name][b] = value[row].detach().float()
            host = _host(losses) if k < limit else {}
            active = [b for row, b in enumerate(active) if k < limit and self._wants_refinement(host, row, b, i)]
            del leaf, objective, losses
        if not update:
            return
        updating = [c for c in self.active if c.updates_at(i)]
        leaf, _, losses = self._evaluate(z, list(images), i)
        moved = self._step(z, list(images), leaf, self._objective(losses, i, updating), i)
        for row, b in enumerate(images):
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
