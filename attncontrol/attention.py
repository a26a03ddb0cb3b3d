"""Attention observed during sampling (DAAM-like): per-subject maps per step, heatmaps, GIFs and metrics.

Asked for with ``generate(..., attention=True)`` (the controls' subjects) or ``attention=["cat", "dog"]``. The
ordinary denoising forward (not the guidance passes) is observed on the cross-attention layers at the map
resolution the methods use (16x16 at 512 px for SD 1.x/2.x, 32x32 at 1024 px for SDXL), for the conditional
half of the batch only. What is kept is small and bounded: per step, per image, per subject, one
``rows x cols`` map (50 steps x 2 subjects x 16 x 16 floats = 100 KB per image), never per-layer tensors.

Two maps are kept per subject: ``maps`` follows the Attend-and-Excite recipe (heads and layers averaged,
x100 softmax over the prompt's tokens, the subject's tokens summed), the maps the methods optimise; ``raw``
is the averaged attention probability of the subject's tokens before any softmax (as DAAM shows it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import OptionError
from .ops import gaussian_smooth, token_softmax


class AttentionObserver:
    """Records head-summed cross-attention of the conditional images in the observed layers, one step at a time.

    ``cfg_batch``: the denoiser's batch is [unconditional; conditional] (its second half is recorded); otherwise
    the first forward of a step is the conditional one, and a layer seen again in the same step (a second,
    unconditional forward, as FLUX's true CFG runs it) is not recorded. Joint layers give only the text
    ``columns`` the maps need; they are put back at their positions of the ``text_len``-long token axis."""

    def __init__(
        self,
        layers: list[str],
        resolution: tuple[int, int],
        subjects: list[list[tuple[int, ...]]],
        keep: torch.Tensor,
        cfg_batch: bool,
        softmax_scale: float = 100.0,
        columns: torch.Tensor | None = None,
    ):
        self.layers = set(layers)
        self.resolution = tuple(resolution)
        self.subjects = subjects  # token positions per image
        self.keep = keep  # (images, tokens) bool
        self.cfg_batch = cfg_batch
        self.softmax_scale = softmax_scale
        self.columns = columns
        self.text_len = int(keep.shape[-1])
        self.active = False
        self._sum: torch.Tensor | None = None
        self._heads = 0
        self._seen: set[str] = set()
        self.steps: list[int] = []
        self.maps: list[torch.Tensor] = []  # per step: (images, subjects, rows, cols) float32 on CPU
        self.raw: list[torch.Tensor] = []

    def cond_half(self, x: torch.Tensor) -> torch.Tensor:
        return x[x.shape[0] // 2 :] if self.cfg_batch else x

    def _first_time(self, layer: str | None) -> bool:
        if layer is None:
            return True
        if layer in self._seen:
            return False  # a second forward in this step: the unconditional one
        self._seen.add(layer)
        return True

    def record(self, probs: torch.Tensor, heads: int, layer: str | None = None) -> None:
        """``probs``: (images * heads, queries, keys) of the conditional images."""
        if not self._first_time(layer):
            return
        bh, q, k = probs.shape
        self._add(probs.detach().float().view(bh // heads, heads, q, k).sum(1), heads)

    def record_heads(self, probs: torch.Tensor, layer: str | None = None) -> None:
        """``probs``: (images, heads, queries, columns) of the conditional images, from a joint layer."""
        if not self._first_time(layer):
            return
        summed = probs.detach().float().sum(1)
        if self.columns is not None and summed.shape[-1] != self.text_len:
            full = summed.new_zeros(*summed.shape[:-1], self.text_len)
            summed = full.index_copy(-1, self.columns.to(summed.device), summed)
        self._add(summed, probs.shape[1])

    def _add(self, summed: torch.Tensor, heads: int) -> None:
        self._sum = summed if self._sum is None else self._sum + summed
        self._heads += heads

    def begin_step(self) -> None:
        self._sum, self._heads, self.active = None, 0, True
        self._seen = set()

    def end_step(self, index: int) -> None:
        self.active = False
        if self._sum is None:
            return
        rows, cols = self.resolution
        mean = (self._sum / self._heads).view(self._sum.shape[0], rows, cols, -1)
        soft = token_softmax(mean, self.keep.to(mean.device), self.softmax_scale)
        self.maps.append(_per_subject(soft, self.subjects).cpu())
        self.raw.append(_per_subject(mean, self.subjects).cpu())
        self.steps.append(index)
        self._sum = None

    def result(self, labels: list[list[str]], timesteps: list[float]) -> AttentionMaps:
        if not self.maps:
            empty = torch.zeros(0, len(self.subjects), len(labels[0]), *self.resolution)
            return AttentionMaps(labels, [], [], empty, empty.clone())
        return AttentionMaps(
            labels=labels,
            steps=list(self.steps),
            timesteps=[timesteps[i] for i in self.steps],
            maps=torch.stack(self.maps),
            raw=torch.stack(self.raw),
        )


def _per_subject(maps: torch.Tensor, subjects: list[list[tuple[int, ...]]]) -> torch.Tensor:
    """(images, rows, cols, tokens) -> (images, subjects, rows, cols), a subject's tokens summed."""
    return torch.stack(
        [torch.stack([maps[b, :, :, list(pos)].sum(-1) for pos in subs]) for b, subs in enumerate(subjects)]
    )


@dataclass
class AttentionMaps:
    """What :class:`AttentionObserver` kept: ``maps`` / ``raw`` are (steps, images, subjects, rows, cols)."""

    labels: list[list[str]]  # per image, the subjects as the user named them
    steps: list[int]
    timesteps: list[float]
    maps: torch.Tensor
    raw: torch.Tensor
    images: list = field(default_factory=list)  # the generated PIL images, for overlays

    def _subject(self, subject: str | int, image: int) -> int:
        labels = self.labels[image]
        if isinstance(subject, int) and not isinstance(subject, bool):
            if not 0 <= subject < len(labels):
                raise IndexError(f"subject index {subject} out of range: this image's subjects are {labels}")
            return subject
        if subject not in labels:
            raise KeyError(f"no attention recorded for subject {subject!r}; recorded: {labels}")
        return labels.index(subject)

    def map(self, subject: str | int, step: int | None = None, image: int = 0, raw: bool = False) -> torch.Tensor:
        """(rows, cols): one step's map (``step`` is the sampling loop index) or, with ``step=None``, the mean
        over all recorded steps."""
        data = self.raw if raw else self.maps
        if data.shape[0] == 0:
            raise OptionError("no attention was recorded (was the run interrupted before its first step?)")
        s = self._subject(subject, image)
        if step is None:
            return data[:, image, s].mean(0)
        if step not in self.steps:
            raise KeyError(f"step {step} was not recorded; recorded steps: {self.steps[0]}..{self.steps[-1]}")
        return data[self.steps.index(step), image, s]

    def heatmap(
        self,
        subject: str | int,
        step: int | None = None,
        image: int = 0,
        base=None,
        alpha: float = 0.55,
        raw: bool = False,
    ):
        """The subject's map, normalised to [0, 1], coloured and laid over the image (``base``, default: the
        generated image) at the image's size: a ``PIL.Image``."""
        from PIL import Image

        m = self.map(subject, step, image, raw).float()
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        base = base if base is not None else (self.images[image] if image < len(self.images) else None)
        size = base.size if base is not None else (m.shape[1] * 32, m.shape[0] * 32)
        heat = Image.fromarray(colormap(m.numpy())).resize(size, Image.Resampling.BILINEAR)
        if base is None:
            return heat
        return Image.blend(base.convert("RGB"), heat, alpha)

    def gif(self, subject: str | int, path=None, image: int = 0, duration_ms: int = 120, raw: bool = False):
        """An animated GIF of the subject's heatmap over the steps; written to ``path`` or returned as bytes."""
        frames = [self.heatmap(subject, step, image, raw=raw) for step in self.steps]
        if not frames:
            raise OptionError("no attention was recorded")
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
        data = buf.getvalue()
        if path is None:
            return data
        from .io import atomic_write_bytes

        atomic_write_bytes(Path(path), lambda fh: fh.write(data))
        return Path(path)

    def metrics(self, image: int = 0) -> dict[str, float]:
        """Per-image attention metrics over the recorded steps (see :func:`attention_metrics`)."""
        return attention_metrics(self.maps[:, image])

    def save(self, directory, image: int = 0, prefix: str = "") -> list[Path]:
        """Heatmap PNG (mean over steps) and GIF (over the steps) per subject, and the maps as ``.pt``."""
        from .io import atomic_save_png, atomic_write_bytes

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for s, stem in enumerate(unique_stems(self.labels[image])):
            stem = f"{prefix}{stem}"
            atomic_save_png(self.heatmap(s, image=image), out / f"{stem}.png")
            written += [out / f"{stem}.png", self.gif(s, out / f"{stem}.gif", image=image)]
        buf = io.BytesIO()
        torch.save(
            {
                "labels": self.labels[image],
                "steps": self.steps,
                "timesteps": self.timesteps,
                "maps": self.maps[:, image].clone(),
                "raw": self.raw[:, image].clone(),
            },
            buf,
        )
        data = buf.getvalue()
        atomic_write_bytes(out / f"{prefix}maps.pt", lambda fh: fh.write(data))
        return [*written, out / f"{prefix}maps.pt"]


def attention_metrics(maps: torch.Tensor) -> dict[str, float]:
    """``maps``: (steps, subjects, rows, cols) A&E-recipe maps of one image. Returns, averaged over the steps:

    - ``min_subject_attention``: the weakest subject's max over pixels of its smoothed map (Attend-and-Excite's
      quantity: 1 minus its loss). Low = a subject is neglected.
    - ``subject_overlap``: the largest, over subject pairs, histogram intersection of the two maps normalised
      to sum 1 (``sum_px min(a, b)``; 0 = disjoint, 1 = identical). High = subjects mixed into one region.
      ``nan`` with fewer than two subjects.
    """
    maps = maps.float()
    steps, n = maps.shape[:2]
    if steps == 0 or n == 0:
        return {"min_subject_attention": float("nan"), "subject_overlap": float("nan")}
    peaks = gaussian_smooth(maps).flatten(2).amax(2)  # (steps, subjects)
    weakest = peaks.amin(1).mean()
    if n < 2:
        return {"min_subject_attention": float(weakest), "subject_overlap": float("nan")}
    flat = maps.flatten(2)
    norm = flat / flat.sum(-1, keepdim=True).clamp_min(1e-12)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    overlap = torch.stack([torch.minimum(norm[:, a], norm[:, b]).sum(-1) for a, b in pairs], 1).amax(1).mean()
    return {"min_subject_attention": float(weakest), "subject_overlap": float(overlap)}


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> uint8 RGB (a perceptual blue-green-yellow ramp, interpolated between fixed stops)."""
    stops = np.array(
        [[0.0, 48, 18, 59], [0.25, 40, 120, 200], [0.5, 30, 200, 140], [0.75, 220, 210, 50], [1.0, 250, 250, 230]]
    )
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, stops[:, 0], stops[:, c]) for c in (1, 2, 3)], -1)
    return rgb.round().astype(np.uint8)


def _slug(text: str) -> str:
    """A file-name-safe form of a subject: letters and digits; a subject with none (emoji) by its characters'
    Unicode names (``"🐱"`` -> ``"cat-face"``)."""
    import re
    import unicodedata

    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()
    if not slug:
        names = [unicodedata.name(ch, "") for ch in str(text) if not ch.isspace()]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", " ".join(names)).strip("-").lower()
    return slug or "subject"


def unique_stems(labels: Sequence[str]) -> list[str]:
    """One distinct file stem per subject: its slug, numbered by position where slugs coincide (``"red car"`` and
    ``"red-car"``, two emoji of one name), so no subject's files overwrite another's."""
    slugs = [_slug(label) for label in labels]
    return [f"{slug}-{k + 1}" if slugs.count(slug) > 1 else slug for k, slug in enumerate(slugs)]


def subjects_of(controls: Sequence) -> list | None:
    """The subjects the controls name (the first control that has any; Refocus: its boxes' subjects)."""
    for c in controls:
        subjects = getattr(c, "subjects", None)
        if subjects:
            return list(subjects)
        boxes = getattr(c, "boxes", None)
        if boxes:
            return list(boxes)
    return None
