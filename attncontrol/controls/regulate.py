"""Attention Regulation (Zhang et al., ECCV 2024, arXiv:2403.06381): inside the cross-attention layers, optimise a
bias on the target tokens' logits so each target gets a high attention quantile and a bounded mean. Edits
attention in the ordinary forward; no gradient through the denoiser. Constants from the official code
(YaNgZhAnG-V5/attention_regulation)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from .base import Control, ControlContext, PreparedEditor, register, subjects_field, window_stop
from .common import attn_res_field, count_field, resolve_attn_res
from .fields import NON_NEGATIVE, UNIT, option
from .vocabulary import MapKey

# -- the objective -----------------------------------------------------------------------------------------------


def gaussian_bumps(rows: int, cols: int, device=None) -> torch.Tensor:
    """(C, rows, cols) Gaussian bumps with sigma = cols // 16 (at least 1), centred every 2 sigma from 2 sigma
    (49 bumps on 16x16, as the official code)."""
    sigma = max(1, cols // 16)
    ys = torch.arange(rows, dtype=torch.float32, device=device)
    xs = torch.arange(cols, dtype=torch.float32, device=device)
    bumps = [
        torch.exp(-((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * sigma**2))
        for cy in range(2 * sigma, rows, 2 * sigma)
        for cx in range(2 * sigma, cols, 2 * sigma)
    ]
    if not bumps:  # maps smaller than 2 sigma: one bump in the middle
        bumps = [torch.exp(-((xs[None, :] - cols // 2) ** 2 + (ys[:, None] - rows // 2) ** 2) / (2 * sigma**2))]
    return torch.stack(bumps)


def regulation_objective(
    target_probs: torch.Tensor,
    weights: torch.Tensor,
    quantile: float = 0.9,
    quantile_target: float = 0.9,
    quantile_weight: float = 1.0,
    mean_weight: float = 80.0,
    weight_penalty: float = 0.09,
) -> torch.Tensor:
    """``quantile_weight * mean((q_0.9(A_k) - 0.9)^2) + mean_weight * mean((mean(A_k) - min(1, 0.2K)/K)^2)
    + weight_penalty * mean(w^2)``. ``target_probs``: (N, pixels, K) attention of the K targets."""
    k = target_probs.shape[-1]
    q = torch.quantile(target_probs, quantile, dim=1)
    mean_target = min(1.0, 0.2 * k) / k
    return (
        quantile_weight * ((q - quantile_target) ** 2).mean()
        + mean_weight * ((target_probs.mean(1) - mean_target) ** 2).mean()
        + weight_penalty * (weights**2).mean()
    )


# -- the options -------------------------------------------------------------------------------------------------


@register("regulate", order=4)
@dataclass
class Regulate(Control):
    """Attention Regulation. The conditional half of the classifier-free-guidance batch is edited; the
    unconditional half is not. The objective is ``quantile_weight * mean((q_quantile - quantile_target)^2) +
    mean_weight * mean((mean - min(1, 0.2K)/K)^2) + weight_penalty * mean(w^2)`` (official: 1, 80, 0.09)."""

    subjects: list = subjects_field(
        "words, phrases, occurrences or token indices; every token of every subject is a target."
    )
    iterations: int = count_field(
        20,
        "in-layer gradient steps on the bump weights, w <- w - N * lr * grad with N "
        "the rows averaged over (official: 20, plain gradient descent), the best-loss bias "
        "kept.",
        low=1,
        app=(1, 100),
    )
    lr: float = option(100.0, "the in-layer step's rate (official: 100).", range=NON_NEGATIVE, app=(0, 1e4))
    quantile: float = option(0.9, "the attention quantile the objective raises (official: 0.9).", range=UNIT)
    quantile_target: float = option(0.9, "its target (official: 0.9).", range=UNIT)
    quantile_weight: float = option(1.0, "the quantile term's weight (official: 1).", range=NON_NEGATIVE)
    mean_weight: float = option(80.0, "the mean term's weight (official: 80).", range=NON_NEGATIVE)
    weight_penalty: float = option(0.09, "the weights' L2 penalty (official: 0.09).", range=NON_NEGATIVE)
    blend: float = option(
        0.25,
        "applied bias decay**step * ((1 - blend) * best + blend * previous step's best) (official: 0.25).",
        range=UNIT,
    )
    decay: float = option(0.99, "see blend (official: 0.99).", range=UNIT)
    attn_res: tuple[int, int] | int | None = attn_res_field(
        "layers edited: all cross-attention layers at this token grid (default 16x16 at 512 px: the official code's "
        "two 16x16 levels of SD; the 8x8 level is left alone)."
    )
    restore_special: bool = option(True, "keep the unedited start- and end-of-text probabilities (official).")
    seed: int = option(
        0,
        "seed of the random initial weights (uniform [0, 1)), so runs are reproducible.",
        low=0,
        high=2**64 - 1,
        app=(0, 2**31 - 1),
    )
    stop: int | float | None = window_stop(
        0.5,
        "edit at steps start .. stop - 1; a float is a fraction of the steps (official: the first 25 of 50 -> 0.5).",
        aliases=("end",),
    )

    def prepare(self, ctx: ControlContext) -> PreparedRegulate:
        return PreparedRegulate(self, ctx)


# -- the edit ----------------------------------------------------------------------------------------------------


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
        self._edited: set[str] = set()
        self.active = False
        self._stats: list[tuple[float, float, float]] = []

    def begin_step(self, step: int) -> None:
        self.step = step
        self._edited = set()
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
                    target_probs,
                    weights,
                    cfg.quantile,
                    cfg.quantile_target,
                    cfg.quantile_weight,
                    cfg.mean_weight,
                    cfg.weight_penalty,
                )
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
        assert before is not None  # iterations >= 1: the loop ran
        self._stats.append((best_loss, before, float(after)))
        return out
