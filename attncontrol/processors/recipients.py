"""Who receives a layer's probabilities in the capture processor: the three jobs a captured layer can have.

- :class:`StoreRecorder`: during a guidance pass, the maps the guidance reads go into the store; after the last
  captured layer the forward stops (:class:`~attncontrol.store.EarlyExit`).
- :class:`ActiveEdits`: in the ordinary forward, the layer's active attention editors turn its scores into the
  probabilities it uses (attention-editing controls such as Attention Regulation).
- :class:`LayerObserver`: in the ordinary forward, the observer (:mod:`attncontrol.attention`) also records the
  conditional probabilities, for the result and the app.

None of them computes attention: the layer's form does (:mod:`.form`), and the capture processor hands each what
the form computed. Each says what it needs from the form: the number of image tokens, the map kinds, the text
columns.
"""

from __future__ import annotations

import torch

from ..store import AttentionStore, AttnLayer, EarlyExit


class StoreRecorder:
    """Records the probabilities of the ``captured`` layers of one processor (named ``name``) into ``store``."""

    def __init__(self, store: AttentionStore, name: str, captured: list[AttnLayer]):
        self.store = store
        self.name = name
        self.captured = captured

    @property
    def n_image(self) -> int:
        rows, cols = self.store.resolutions[self.captured[0].name]
        return rows * cols

    @property
    def kinds(self) -> set[str]:
        return {la.kind for la in self.captured}

    @property
    def columns(self) -> torch.Tensor | None:
        return self.store.columns

    def record(self, probs: torch.Tensor, heads: int) -> None:
        """The probabilities an explicit-scores form used, (batch * heads, queries, keys), of this processor's layer."""
        store = self.store
        store.record(self.name, probs, heads)
        if store.early_exit and self.name == store.last_layer:
            raise EarlyExit  # nothing after this layer feeds the loss

    def record_maps(self, maps: dict) -> None:
        """The maps a form gave beside the layer's own processor: ``{"cross": (P, mass), "self": P}``."""
        store = self.store
        for la in self.captured:
            if la.kind == "cross":
                store.record_heads(la.name, *maps["cross"])
            else:
                store.record_heads(la.name, maps["self"])
        if store.early_exit and any(la.name == store.last_layer for la in self.captured):
            raise EarlyExit


class ActiveEdits:
    """The editors of one layer that are active in this forward (never empty): each sees the layer's scores, the
    last one's probabilities are the layer's."""

    def __init__(self, name: str, editors: list):
        self.name = name
        self.editors = editors

    @classmethod
    def of(cls, name: str, editors: list) -> ActiveEdits | None:
        """The active ones among ``editors``, or None when none is."""
        active = [e for e in editors if e.active]
        return cls(name, active) if active else None

    @property
    def n_image(self) -> int:
        rows, cols = self.editors[0].resolution
        return rows * cols

    def edit(self, scores: torch.Tensor, heads: int, text_offset: int = 0) -> torch.Tensor:
        """Scores -> the probabilities the layer uses."""
        for editor in self.editors[:-1]:
            editor.edit(self.name, scores, heads, text_offset)
        return self.editors[-1].edit(self.name, scores, heads, text_offset)


class LayerObserver:
    """The run's observer, for one processor (named ``name``): records the conditional probabilities it sees."""

    def __init__(self, name: str, observer):
        self.name = name
        self.observer = observer

    @property
    def active(self) -> bool:
        return bool(self.observer.active)

    @property
    def n_image(self) -> int:
        rows, cols = self.observer.resolution
        return rows * cols

    @property
    def columns(self) -> torch.Tensor | None:
        return self.observer.columns

    def cond_half(self, x: torch.Tensor) -> torch.Tensor:
        return self.observer.cond_half(x)

    def record_conditional(self, probs: torch.Tensor, heads: int) -> None:
        """An observing form's probabilities of the conditional half, (images * heads, queries, keys)."""
        self.observer.record(probs, heads, self.name)

    def record_cross(self, probs: torch.Tensor) -> None:
        """The "cross" maps of a form without its own observe path, (batch, heads, queries, columns)."""
        self.observer.record_heads(self.observer.cond_half(probs), self.name)

    def record_explicit(self, probs: torch.Tensor, heads: int) -> None:
        """The probabilities an explicit-scores form used, (batch * heads, queries, keys): their conditional half."""
        per_image = probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])
        self.observer.record(self.observer.cond_half(per_image).flatten(0, 1), heads, self.name)

    def record_edited(self, probs: torch.Tensor) -> None:
        """``probs``: (batch, heads, image queries, text keys) of an edited layer without explicit scores."""
        obs = self.observer
        cols = obs.columns
        obs.record_heads(
            obs.cond_half(probs.detach())[..., cols.to(probs.device)]
            if cols is not None
            else obs.cond_half(probs.detach()),
            self.name,
        )


class LayerRegions:
    """Regional prompting (:class:`~attncontrol.controls.regions.PreparedRegions`) in one layer: its layout at the
    layer's grid and form, the plain rows of a batch, and the base weight of the current step. Acts in every
    forward, ordinary and guidance passes alike (a guidance method then optimises the network that is sampled)."""

    def __init__(self, name: str, regions, text_first: bool | None):
        self.name = name
        self.regions = regions
        self.text_first = text_first
        self._layout = None
        self._step, self._forwards = -1, 0

    @property
    def layout(self):
        from .regional import RegionLayout

        regions = self.regions
        if self._layout is None or self._layout.segments != regions.segments:
            labels = regions.labels[regions.grid_of[self.name]]
            self._layout = RegionLayout(regions.segments, labels, self.text_first, regions.image_self)
        return self._layout

    @property
    def beta(self) -> float:
        return float(self.regions.weight)

    def negative_forward(self, guidance: bool) -> bool:
        """Called once per call of the layer: whether this call is a negative branch run as its own forward (a
        family that runs classifier-free guidance as two forwards runs the positive one first; the layer's second
        ordinary call in a step is the negative one, whatever its text length)."""
        regions = self.regions
        if guidance or regions.cfg_batch:
            return False
        if regions.step != self._step:
            self._step, self._forwards = regions.step, 0
        self._forwards += 1
        return self._forwards > 1

    def n_plain(self, batch: int, guidance: bool) -> int:
        """Leading rows of the batch that are not the conditional branch: the negative half of a batched
        classifier-free-guidance forward (a guidance pass is the conditional branch alone)."""
        regions = self.regions
        return batch // 2 if not guidance and regions.cfg_batch and batch == 2 * regions.n_images else 0
