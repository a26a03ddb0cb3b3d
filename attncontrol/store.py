"""AttentionStore: the attention probabilities captured in one forward pass, aggregated on demand."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ResolutionError


@dataclass(frozen=True)
class AttnLayer:
    """One capturable attention layer of the denoiser, as its family's adapter describes it.

    ``name`` is the layer's key in the denoiser's ``attn_processors``; ``kind`` is "cross" (image queries, text
    keys) or "self" (image queries, image keys); its token grid is the latent grid halved (rounding up) ``level``
    times; ``order`` is its position in one forward; ``block`` names the top-level block that holds it. ``ops``
    computes the layer's queries, keys and output the way the layer's own processor does (see
    :mod:`attncontrol.processors`)."""

    name: str
    kind: str
    block: str
    level: int
    order: int
    ops: Any = field(default=None, compare=False, repr=False)

    @property
    def module_name(self) -> str:
        return self.name.removesuffix(".processor")


def grid_after(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """(rows, cols) of a token grid after ``level`` stride-2 halvings of the latent grid (rounding up)."""
    rows, cols = latent_hw
    for _ in range(level):
        rows, cols = (rows + 1) // 2, (cols + 1) // 2
    return rows, cols


class AttentionStore:
    """Holds, per captured layer, the head-summed attention probabilities of the last guidance forward.

    ``active`` is switched on only while a guidance pass runs; the capture processors then compute
    explicit probabilities and record them here, and raise :class:`EarlyExit` after the last captured
    layer so the rest of the network is never run.
    """

    def __init__(self, layers: list[AttnLayer], resolutions: dict[str, tuple[int, int]]):
        if not layers:
            raise ValueError("an AttentionStore needs at least one layer to capture")
        self.layers = sorted(layers, key=lambda layer: layer.order)
        self.resolutions = dict(resolutions)  # layer name -> (rows, cols) expected at this image size
        self.last_layer = self.layers[-1].name
        self.active = False
        self.early_exit = True
        self._sums: dict[str, torch.Tensor] = {}
        self._heads: dict[str, int] = {}

    def reset(self) -> None:
        self._sums.clear()
        self._heads.clear()

    def record(self, name: str, probs: torch.Tensor, heads: int) -> None:
        """``probs``: (batch * heads, queries, keys) as diffusers' ``get_attention_scores`` returns them."""
        rows, cols = self.resolutions[name]
        bh, q, k = probs.shape
        if q != rows * cols:
            raise ResolutionError(
                f"layer {name} produced {q} queries, expected {rows}x{cols}={rows * cols}; the image size does "
                "not match the layer resolution computed for it"
            )
        # maps and losses in float32 at least (float64 stays float64, for exact comparisons)
        probs = probs.to(torch.promote_types(probs.dtype, torch.float32))
        self._sums[name] = probs.view(bh // heads, heads, q, k).sum(1)
        self._heads[name] = heads

    def captured(self, kind: str = "cross", resolution: tuple[int, int] | None = None) -> list[str]:
        return [
            layer.name
            for layer in self.layers
            if layer.kind == kind
            and layer.name in self._sums
            and (resolution is None or self.resolutions[layer.name] == tuple(resolution))
        ]

    def maps(self, resolution: tuple[int, int], kind: str = "cross") -> torch.Tensor:
        """Mean over heads and layers at ``resolution``: (batch, rows, cols, keys), float32 or wider.

        Heads are pooled across layers (sum of all heads / number of heads), as Prompt-to-Prompt and
        diffusers' Attend-and-Excite aggregate them.
        """
        names = self.captured(kind, resolution)
        if not names:
            raise RuntimeError(f"no {kind}-attention captured at {resolution}; was the guidance forward run?")
        total = sum(self._sums[n] for n in names)
        heads = sum(self._heads[n] for n in names)
        rows, cols = resolution
        out = total / heads
        return out.view(out.shape[0], rows, cols, out.shape[-1])


class EarlyExit(Exception):
    """Raised after the last captured layer of a guidance forward; the caller catches it."""
