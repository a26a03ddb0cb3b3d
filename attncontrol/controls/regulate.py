"""Attention Regulation (Zhang et al., ECCV 2024): inside the cross-attention layers, optimise a bias on the
target tokens' logits so each target gets a high attention quantile and a bounded mean. Edits attention
in the ordinary forward; no gradient through the denoiser. Constants from the official code
(YaNgZhAnG-V5/attention_regulation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError
from ..limits import check_count
from ..losses.regulate import gaussian_bumps, regulation_objective
from ..store import MapKey
from .base import Control, ControlContext, PreparedEditor, with_aliases
from .common import normalise_attn_res, resolve_attn_res
from .options import check_fields


@with_aliases
@dataclass
class Regulate(Control):
    """Attention Regulation.

    Args:
        subjects: words, phrases, occurrences or token indices; every token of every subject is a target.
        stop (alias ``end``): edit at steps ``start .. stop - 1``; a float is a fraction of the steps (official:
            the first 25 of 50 -> 0.5).
        iterations, lr: in-layer gradient steps on the bump weights, ``w <- w - N * lr * grad`` with N the
            rows averaged over (official: 20, 100, plain gradient descent; at most 1000 iterations), the best-loss
            bias kept.
        quantile, quantile_target, quantile_weight, mean_weight, weight_penalty: the objective
            ``1 * mean((q_0.9 - 0.9)^2) + 80 * mean((mean - min(1, 0.2K)/K)^2) + 0.09 * mean(w^2)``.
        blend, decay: applied bias ``decay**step * ((1 - blend) * best + blend * previous step's best)``
            (official 0.25, 0.99).
        attn_res: layers edited: all cross-attention layers at this token grid (default 16x16 at 512 px: the
            official code's two 16x16 levels of SD; the 8x8 level is left alone).
        restore_special: keep the unedited start- and end-of-text probabilities (official behaviour).
        seed: seed of the random initial weights (uniform [0, 1)), so runs are reproducible.
    The conditional half of the classifier-free-guidance batch is edited; the unconditional half is not.
    """

    method: ClassVar[str] = "regulate"
    aliases: ClassVar[dict[str, str]] = {"end": "stop"}

    subjects: list = field(default_factory=list)
    iterations: int = 20
    lr: float = 100.0
    quantile: float = 0.9
    quantile_target: float = 0.9
    quantile_weight: float = 1.0
    mean_weight: float = 80.0
    weight_penalty: float = 0.09
    blend: float = 0.25
    decay: float = 0.99
    attn_res: tuple[int, int] | int | None = None
    restore_special: bool = True
    seed: int = 0
    stop: int | float | None = field(default=0.5, kw_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate_subjects()
        self.validate_window()
        check_count(self.iterations, "iterations", low=1)
        for name in ("lr", "quantile_weight", "mean_weight", "weight_penalty"):
            if getattr(self, name) < 0:
                raise OptionError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("quantile", "quantile_target", "blend", "decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise OptionError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        self.attn_res = normalise_attn_res(self.attn_res)

    def prepare(self, ctx: ControlContext) -> PreparedRegulate:
        return PreparedRegulate(self, ctx)


class PreparedRegulate(PreparedEditor):
    def __init__(self, cfg: Regulate, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.resolution = resolve_attn_res(cfg.attn_res, ctx)
        self.layers = ctx.select(MapKey("cross", self.resolution))
        subjects = ctx.subjects_per_image(cfg.subjects)
        self.targets = [sorted({p for pos in subs for p in pos}) for subs in subjects]
        self.specials = ctx.special_positions()  # start/end-of-text columns, per image
        self.n_images = len(ctx.prompts)
        self.cfg_batch = ctx.cfg_batch
        self.bumps = gaussian_bumps(*self.resolution, device=ctx.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.previous: dict[tuple[str, int], torch.Tensor] = {}
        self.step = 0
        self._edited = set()
        self.active = False
        self._stats: list[tuple[float, float, float]] = []

    def begin_step(self, step: int) -> None:
        self.step = step
        self._edited: set[str] = set()
        self.active = self.in_window(step)
        self._stats = []

    def step_stats(self) -> dict[str, float]:
        if not self._stats:
            return {}
        n = len(self._stats)
        return {
            "loss": sum(s[0] for s in self._stats) / n,
            "quantile_before": sum(s[1] for s in self._stats) / n,
            "quantile_after": sum(s[2] for s in self._stats) / n,
        }

    def edit(self, layer: str, scores: torch.Tensor, heads: int, text_offset: int = 0) -> torch.Tensor:
        """``scores``: (batch * heads, image queries, keys); text position p is key column ``text_offset + p``
        (joint layers put image keys first in SD3, text first in FLUX)."""
        probs0 = torch.softmax(scores, dim=-1)
        batch = scores.shape[0] // heads
        if batch != (2 if self.cfg_batch else 1) * self.n_images or layer in self._edited:
            # not the run's denoising batch (someone else's forward), or this layer's second forward of the step
            # (the unconditional one, where the branches run one after the other): leave it alone
            return probs0
        self._edited.add(layer)
        rows, cols = self.resolution
        offset = self.n_images if self.cfg_batch else 0
        edited = scores.clone()
        for image in range(self.n_images):
            sl = slice((offset + image) * heads, (offset + image + 1) * heads)
            edited[sl] = self._regulate(layer, image, scores[sl], rows, cols, text_offset)
        probs = torch.softmax(edited, dim=-1)
        if self.cfg.restore_special:
            for image in range(self.n_images):
                sl = slice((offset + image) * heads, (offset + image + 1) * heads)
                for col in self.specials[image]:
                    probs[sl, :, text_offset + col] = probs0[sl, :, text_offset + col]
        return probs

    def _regulate(self, layer, image: int, logits: torch.Tensor, rows: int, cols: int, text_offset: int = 0):
        """One image's heads: (heads, pixels, keys) logits -> logits with the optimised bias on its targets."""
        cfg = self.cfg
        targets = [text_offset + t for t in self.targets[image]]
        n_rows = logits.shape[0]
        bumps = self.bumps.flatten(1)  # (C, pixels)
        weights = torch.rand(n_rows, bumps.shape[0], len(targets), generator=self.generator).to(logits.device)
        initial = torch.einsum("cp,nck->npk", bumps, weights)
        best, best_loss, before = initial, float("inf"), None
        with torch.enable_grad():
            for _ in range(cfg.iterations):
                weights.requires_grad_(True)
                bias = torch.einsum("cp,nck->npk", bumps, weights)
                shifted = logits.index_add(2, torch.tensor(targets, device=logits.device), bias)
                target_probs = torch.softmax(shifted, dim=-1)[..., targets]
                loss = regulation_objective(
                    target_probs, weights, cfg.quantile, cfg.quantile_target, cfg.quantile_weight, cfg.mean_weight,
                    cfg.weight_penalty,
                )  # fmt: skip
                if before is None:
                    plain = torch.softmax(logits, dim=-1)[..., targets]
                    before = float(torch.quantile(plain, cfg.quantile, dim=1).mean())
                if float(loss.detach()) < best_loss:
                    best_loss, best = float(loss.detach()), bias.detach()
                (grad,) = torch.autograd.grad(loss, [weights])
                weights = (weights - n_rows * cfg.lr * grad).detach()
        key = (layer, image)
        previous = self.previous.get(key, initial)
        self.previous[key] = best
        applied = (cfg.decay**self.step) * ((1 - cfg.blend) * best + cfg.blend * previous)
        out = logits.index_add(2, torch.tensor(targets, device=logits.device), applied)
        after = torch.quantile(torch.softmax(out, dim=-1)[..., targets], cfg.quantile, dim=1).mean()
        self._stats.append((best_loss, before, float(after)))
        return out
