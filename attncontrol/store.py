"""AttentionStore: the attention probabilities captured in one forward pass, aggregated on demand."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._lazy import torch
from .errors import ResolutionError


@dataclass(frozen=True)
class AttnLayer:
    """One capturable attention map of the denoiser, as its family's adapter describes it.

    ``name`` identifies it (for most layers, its key in the denoiser's ``attn_processors``); ``processor`` is
    that key (a joint layer gives two maps, "cross" and "self", through one processor); ``kind`` is "cross"
    (image queries, text keys) or "self" (image queries, image keys); its token grid is the latent grid halved
    (rounding up) ``level`` times; ``order`` is its position in one forward; ``block`` names the top-level block
    that holds it and ``block_index`` numbers it for ``blocks=`` (transformer families). ``ops`` computes the
    layer's queries, keys and probabilities the way the layer's own processor does (see
    :mod:`attncontrol.processors`)."""

    name: str
    kind: str
    block: str
    level: int
    order: int
    ops: Any = field(default=None, compare=False, repr=False)
    processor: str = ""
    block_index: int | None = None

    def __post_init__(self) -> None:
        if not self.processor:
            object.__setattr__(self, "processor", self.name)

    @property
    def module_name(self) -> str:
        return self.processor.removesuffix(".processor")


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
    layer so the rest of the network is never run. Joint layers record only the text ``columns`` that the
    run's controls read; they are put back at their positions of the ``text_len``-long token axis.
    """

    def __init__(
        self,
        layers: list[AttnLayer],
        resolutions: dict[str, tuple[int, int]],
        columns: torch.Tensor | None = None,
        text_len: int | None = None,
        text_normalised: bool = False,
    ):
        if not layers:
            raise ValueError("an AttentionStore needs at least one layer to capture")
        self.layers = sorted(layers, key=lambda layer: layer.order)
        self.resolutions = dict(resolutions)  # layer name -> (rows, cols) expected at this image size
        self.last_layer = self.layers[-1].name
        self.columns = columns
        self.text_len = text_len
        self.text_normalised = text_normalised  # also keep the text-renormalised sums of joint layers
        self.active = False
        self.early_exit = True
        self.replaying = False  # a checkpoint's recompute: compute as in the forward, keep nothing
        self._sums: dict[tuple[str, str], torch.Tensor] = {}
        self._heads: dict[str, int] = {}

    def reset(self) -> None:
        self._sums.clear()
        self._heads.clear()

    def _check(self, name: str, q: int) -> None:
        rows, cols = self.resolutions[name]
        if q != rows * cols:
            raise ResolutionError(
                f"layer {name} produced {q} queries, expected {rows}x{cols}={rows * cols}; the image size does "
                "not match the layer resolution computed for it"
            )

    def record(self, name: str, probs: torch.Tensor, heads: int) -> None:
        """``probs``: (batch * heads, queries, keys) as diffusers' ``get_attention_scores`` returns them."""
        bh, q, k = probs.shape
        self._check(name, q)
        # maps and losses in float32 at least (float64 stays float64, for exact comparisons)
        probs = probs.to(torch.promote_types(probs.dtype, torch.float32))
        summed = probs.view(bh // heads, heads, q, k).sum(1)
        if self.replaying:
            return
        self._sums[(name, "all")] = summed
        if self.text_normalised:  # every key of a cross-attention layer is text: nothing to renormalise
            self._sums[(name, "text")] = summed
        self._heads[name] = heads

    def record_heads(self, name: str, probs: torch.Tensor, mass: torch.Tensor | None = None) -> None:
        """``probs``: (batch, heads, queries, keys or columns) of a joint layer; ``mass``: for image->text maps,
        (batch, heads, queries), each query's probability on all text keys (then ``probs`` holds the recorded
        text columns; without it, ``probs`` are image->image maps)."""
        b, heads, q, _ = probs.shape
        self._check(name, q)
        probs = probs.to(torch.promote_types(probs.dtype, torch.float32))
        sums = {"all": self._place(probs.sum(1)) if mass is not None else probs.sum(1)}
        if mass is not None and self.text_normalised:
            sums["text"] = self._place((probs / mass.to(probs.dtype)[..., None]).sum(1))
        if self.replaying:
            return
        for variant, value in sums.items():
            self._sums[(name, variant)] = value
        self._heads[name] = heads

    def _place(self, summed: torch.Tensor) -> torch.Tensor:
        """Recorded text columns back at their positions of the token axis (zeros elsewhere)."""
        if self.columns is None or summed.shape[-1] == self.text_len or self.text_len is None:
            return summed
        full = summed.new_zeros(*summed.shape[:-1], self.text_len)
        return full.index_copy(-1, self.columns.to(summed.device), summed)

    def captured(self, kind: str = "cross", resolution: tuple[int, int] | None = None) -> list[str]:
        return [
            layer.name
            for layer in self.layers
            if layer.kind == kind
            and (layer.name, "all") in self._sums
            and (resolution is None or self.resolutions[layer.name] == tuple(resolution))
        ]

    def maps(self, resolution: tuple[int, int], kind: str = "cross") -> torch.Tensor:
        """Mean over heads and every captured layer of ``kind`` at ``resolution``: (batch, rows, cols, keys)."""
        names = self.captured(kind, resolution)
        if not names:
            raise RuntimeError(f"no {kind}-attention captured at {resolution}; was the guidance forward run?")
        return self.maps_of(names, resolution)

    def maps_of(self, names: list[str], resolution: tuple[int, int], variant: str = "all") -> torch.Tensor:
        """Mean over heads and ``names``: (batch, rows, cols, keys), float32 or wider.

        Heads are pooled across layers (sum of all heads / number of heads), as Prompt-to-Prompt and
        diffusers' Attend-and-Excite aggregate them (with equal head counts: the mean over heads, then layers).
        """
        missing = [n for n in names if (n, variant) not in self._sums]
        if missing:
            raise RuntimeError(f"no attention captured from {missing} ({variant}); was the guidance forward run?")
        if not names:
            raise RuntimeError(f"no layers named for the {variant} maps at {resolution}")
        total = self._sums[(names[0], variant)]
        for n in names[1:]:  # in order, as sum() added them
            total = total + self._sums[(n, variant)]
        heads = sum(self._heads[n] for n in names)
        rows, cols = resolution
        out = total / heads
        return out.view(out.shape[0], rows, cols, out.shape[-1])


class EarlyExit(Exception):
    """Raised after the last captured layer of a guidance forward; the caller catches it."""
