"""The capture processor and its install/restore. Which layers exist, and how each computes its attention, is
the adapter's knowledge (:class:`~attncontrol.store.AttnLayer` and its ``ops``); this module only decides, per
call, whether a layer runs its own processor or a path that records or edits probabilities."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..store import AttentionStore, AttnLayer, EarlyExit


class CaptureProcessor:
    """Delegates to the layer's own processor (SDPA, xformers, a user's) except:

    - during a guidance pass (``store.active``) on a captured layer: its probabilities are recorded in the store
      (classic layers: through an explicit attention; joint layers: beside the layer's own processor, without
      the full matrix); after the last captured layer the forward stops with :class:`EarlyExit`;
    - in the ordinary forward while one of its ``editors`` is active: explicit attention whose probabilities
      the editor rewrites (attention-editing controls such as Attention Regulation);
    - in the ordinary forward while its ``observer`` is active: the conditional probabilities are also
      recorded (the output is the original processor's, or the editors').

    ``layers``: the adapter's entries that this processor serves (a joint layer has a "cross" and a "self" one).
    """

    def __init__(self, original, store: AttentionStore | None, layers: list[AttnLayer], captured=(), editors=(),
                 observer=None):  # fmt: skip
        self.original = original
        self.store = store
        self.layers = list(layers)
        self.layer = self.layers[0]
        self.name = self.layer.name
        self.captured = [la for la in self.layers if la.name in set(captured)] if store is not None else []
        self.capture = bool(self.captured)
        self.editors = list(editors)
        self.observer = observer
        self.signature = inspect.signature(original.__call__)
        # diffusers filters cross_attention_kwargs by the processor's signature: expose the original's.
        self.__dict__["__call__"] = _SignatureProxy(self, self.signature)

    def _arguments(self, attn, args, kwargs) -> dict:
        """The call's arguments by name, as the original processor would read them (FLUX passes them by position)."""
        bound = self.signature.bind_partial(attn, *args, **kwargs).arguments
        bound.pop("self", None)
        extra = bound.pop("kwargs", None) or {}
        return {**bound, **extra}

    def __call__(self, attn, *args, **kwargs):
        ops = self.layer.ops
        if self.store is not None and self.store.active:
            if self.capture:
                if hasattr(ops, "explicit"):
                    named = self._arguments(attn, args, kwargs)
                    return ops.explicit(attn, named["hidden_states"], named.get("encoder_hidden_states"),
                                        named.get("attention_mask"), named.get("temb"), self._record)  # fmt: skip
                self._record_joint(attn, self._arguments(attn, args, kwargs))
        else:
            editors = [e for e in self.editors if e.active]
            observing = self.observer is not None and self.observer.active
            if editors or observing:
                named = self._arguments(attn, args, kwargs)
                hidden, context, mask = named["hidden_states"], named.get("encoder_hidden_states"), named.get(
                    "attention_mask"
                )  # fmt: skip
            if editors and hasattr(ops, "explicit"):
                return ops.explicit(
                    attn, hidden, context, mask, named.get("temb"),
                    on_probs=self._observed if observing else None, on_scores=self._editing(editors),
                )  # fmt: skip
            if editors:
                grid = editors[0].resolution
                observe = self._observed_joint if observing else None
                return ops.edited(attn, named, grid[0] * grid[1], lambda: self.original(attn, *args, **kwargs),
                                  self._editing(editors), observe)  # fmt: skip
            if observing:
                self._observe(attn, ops, named)
        return self.original(attn, *args, **kwargs)

    def _record(self, probs: torch.Tensor, heads: int) -> None:
        store = self.store
        assert store is not None  # only captured layers record, and a processor without a store captures none
        store.record(self.name, probs, heads)
        if store.early_exit and self.name == store.last_layer:
            raise EarlyExit  # nothing after this layer feeds the loss

    def _record_joint(self, attn, named: dict) -> None:
        store = self.store
        assert store is not None  # as in _record
        grid = store.resolutions[self.captured[0].name]
        kinds = {la.kind for la in self.captured}
        maps = self.layer.ops.maps(attn, named, grid[0] * grid[1], kinds, store.columns)
        for la in self.captured:
            if la.kind == "cross":
                store.record_heads(la.name, *maps["cross"])
            else:
                store.record_heads(la.name, maps["self"])
        if store.early_exit and any(la.name == store.last_layer for la in self.captured):
            raise EarlyExit

    @torch.no_grad()
    def _observe(self, attn, ops, named: dict) -> None:
        obs = self.observer
        if hasattr(ops, "observe"):
            probs = ops.observe(attn, named["hidden_states"], named.get("encoder_hidden_states"),
                                named.get("attention_mask"), obs.cond_half)  # fmt: skip
            obs.record(probs, attn.heads, self.name)
            return
        grid = obs.resolution
        maps = ops.maps(attn, named, grid[0] * grid[1], {"cross"}, obs.columns)
        probs = obs.cond_half(maps["cross"][0])  # (images, heads, queries, columns)
        obs.record_heads(probs, self.name)

    def _editing(self, editors: list):
        """The scores-to-probabilities edit of the active ``editors`` (not empty): each sees the layer's scores,
        the last one's probabilities are the layer's."""

        def edit(scores: torch.Tensor, heads: int, text_offset: int = 0) -> torch.Tensor:
            for editor in editors[:-1]:
                editor.edit(self.name, scores, heads, text_offset)
            return editors[-1].edit(self.name, scores, heads, text_offset)

        return edit

    def _observed_joint(self, probs: torch.Tensor) -> None:
        """``probs``: (batch, heads, image queries, text keys) of an edited joint layer."""
        obs = self.observer
        cols = obs.columns
        self.observer.record_heads(obs.cond_half(probs.detach())[..., cols.to(probs.device)] if cols is not None
                                   else obs.cond_half(probs.detach()), self.name)  # fmt: skip

    def _observed(self, probs: torch.Tensor, heads: int) -> None:
        per_image = probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])
        self.observer.record(self.observer.cond_half(per_image).flatten(0, 1), heads, self.name)


class _SignatureProxy:
    """Stands in for ``processor.__call__`` when diffusers inspects it; calling it calls the processor."""

    def __init__(self, processor: CaptureProcessor, signature: inspect.Signature):
        self._processor = processor
        self.__signature__ = signature

    def __call__(self, *args, **kwargs):
        return CaptureProcessor.__call__(self._processor, *args, **kwargs)


@contextmanager
def capture_layers(
    denoiser,
    layers: list[AttnLayer],
    store: AttentionStore | None = None,
    editors: dict[str, list] | None = None,
    observer=None,
) -> Iterator[dict]:
    """Install :class:`CaptureProcessor` on the processors of the store's, the edited and the observed layers only
    (``layers``: the adapter's description of every capturable layer); restore every original processor on exit,
    also when an error is raised."""
    saved = dict(denoiser.attn_processors)
    by_name = {layer.name: layer for layer in layers}
    captured = {layer.name for layer in store.layers} if store is not None else set()
    editors = editors or {}
    observed = set(observer.layers) if observer is not None else set()
    wanted = captured | set(editors) | observed
    missing = sorted(wanted - by_name.keys())
    if missing:
        raise ValueError(f"layers not in this model: {missing}")
    per_processor: dict[str, list[AttnLayer]] = {}
    for layer in layers:
        per_processor.setdefault(layer.processor, []).append(layer)
    wanted_processors = {by_name[name].processor for name in wanted}
    missing = sorted(wanted_processors - saved.keys())
    if missing:
        raise ValueError(f"layers not in this model: {missing}")
    procs = {}
    for key, proc in saved.items():
        if key not in wanted_processors:
            procs[key] = proc
            continue
        entries = per_processor[key]
        names = {la.name for la in entries}
        procs[key] = CaptureProcessor(
            proc, store, entries, captured & names, [e for n in names for e in editors.get(n, ())],
            observer if observed & names else None,
        )  # fmt: skip
    try:
        denoiser.set_attn_processor(dict(procs))  # set_attn_processor pops from the dict it is given
        yield procs
    finally:
        denoiser.set_attn_processor(dict(saved))
        if store is not None:
            store.active = False
            store.reset()
