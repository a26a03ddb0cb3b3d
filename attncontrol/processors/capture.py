"""The capture processor and its install/restore. Which layers exist, and how each computes its attention, is
the adapter's knowledge (:class:`~attncontrol.store.AttnLayer` and its ``ops``); this module only decides, per
call, whether a layer runs its own processor or an explicit path that records or edits probabilities."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..store import AttentionStore, AttnLayer, EarlyExit


class CaptureProcessor:
    """Delegates to the layer's own processor (SDPA, xformers, a user's) except:

    - during a guidance pass (``store.active``) on a captured layer: explicit probabilities, recorded in the
      store; after the last captured layer the forward stops with :class:`EarlyExit`;
    - in the ordinary forward while one of its ``editors`` is active: explicit attention whose probabilities
      the editor rewrites (attention-editing controls such as Attention Regulation);
    - in the ordinary forward while its ``observer`` is active: the conditional half's probabilities are also
      recorded (the output is the original processor's, or the editors').
    """

    def __init__(
        self, original, store: AttentionStore | None, layer: AttnLayer, capture: bool = True, editors=(), observer=None
    ):
        self.original = original
        self.store = store
        self.layer = layer
        self.name = layer.name
        self.capture = capture and store is not None
        self.editors = list(editors)
        self.observer = observer
        # diffusers filters cross_attention_kwargs by the processor's signature: expose the original's.
        self.__dict__["__call__"] = _SignatureProxy(self, inspect.signature(original.__call__))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ops = self.layer.ops
        if self.store is not None and self.store.active:
            if self.capture:
                return ops.explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, self._record)
        else:
            editors = [e for e in self.editors if e.active]
            observing = self.observer is not None and self.observer.active
            if editors:
                return ops.explicit(
                    attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                    on_probs=self._observed if observing else None, on_scores=self._editing(editors),
                )  # fmt: skip
            if observing:
                probs = ops.observe(attn, hidden_states, encoder_hidden_states, attention_mask, self.observer.cond_half)
                self.observer.record(probs, attn.heads)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def _record(self, probs: torch.Tensor, heads: int) -> None:
        self.store.record(self.name, probs, heads)
        if self.store.early_exit and self.name == self.store.last_layer:
            raise EarlyExit  # nothing after this layer feeds the loss

    def _editing(self, editors):
        def edit(scores: torch.Tensor, heads: int, batch: int) -> torch.Tensor:
            probs = None
            for editor in editors:
                probs = editor.edit(self.name, scores, heads)
            return probs

        return edit

    def _observed(self, probs: torch.Tensor, heads: int) -> None:
        per_image = probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])
        self.observer.record(self.observer.cond_half(per_image).flatten(0, 1), heads)


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
    """Install :class:`CaptureProcessor` on the store's, the edited and the observed layers only (``layers``: the
    adapter's description of every capturable layer); restore every original processor on exit, also when an
    error is raised."""
    saved = dict(denoiser.attn_processors)
    by_name = {layer.name: layer for layer in layers}
    captured = {layer.name for layer in store.layers} if store is not None else set()
    editors = editors or {}
    observed = set(observer.layers) if observer is not None else set()
    wanted = captured | set(editors) | observed
    missing = sorted((wanted - saved.keys()) | (wanted - by_name.keys()))
    if missing:
        raise ValueError(f"layers not in this model: {missing}")
    procs = {
        name: CaptureProcessor(
            proc, store, by_name[name], name in captured, editors.get(name, ()), observer if name in observed else None
        )
        if name in wanted
        else proc
        for name, proc in saved.items()
    }
    try:
        denoiser.set_attn_processor(dict(procs))  # set_attn_processor pops from the dict it is given
        yield procs
    finally:
        denoiser.set_attn_processor(dict(saved))
        if store is not None:
            store.active = False
            store.reset()
