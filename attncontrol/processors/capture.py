"""The capture processor and its install/restore. Which layers exist, and how each computes its attention, is
the adapter's knowledge (:class:`~attncontrol.store.AttnLayer` and its ``ops``, an
:class:`~attncontrol.processors.form.AttentionForm`); what is done with the probabilities is the recipients'
(:mod:`.recipients`). This module only decides, per call, whether a layer runs its own processor or asks its form
for the probabilities its recorder, editors or observer need."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import UnsupportedPipelineError
from ..store import AttentionStore, AttnLayer
from .form import AttentionForm
from .joint import image_probs
from .recipients import ActiveEdits, LayerObserver, LayerRegions, StoreRecorder


class CaptureProcessor:
    """Delegates to the layer's own processor (SDPA, xformers, a user's) except:

    - during a guidance pass (``store.active``) on a captured layer: its probabilities are recorded in the store
      by its :class:`~.recipients.StoreRecorder` (forms with explicit scores: inside an explicit attention; the
      others: beside the layer's own processor, without the full matrix); after the last captured layer the
      forward stops with :class:`~attncontrol.store.EarlyExit`;
    - in the ordinary forward while one of its ``editors`` is active: the form's edited attention, whose
      probabilities the editors rewrite (attention-editing controls such as Attention Regulation);
    - in the ordinary forward while its ``observer`` is active: the conditional probabilities are also
      recorded (the output is the original processor's, or the editors').

    ``layers``: the adapter's entries that this processor serves (a joint layer has a "cross" and a "self" one).
    """

    def __init__(
        self,
        original,
        store: AttentionStore | None,
        layers: list[AttnLayer],
        captured=(),
        editors=(),
        observer=None,
        regions=None,
    ):
        self.original = original
        self.store = store
        self.layers = list(layers)
        self.layer = self.layers[0]
        self.name = self.layer.name
        self.captured = [la for la in self.layers if la.name in set(captured)] if store is not None else []
        self.capture = bool(self.captured)
        self.editors = list(editors)
        self.observer = observer
        self.recorder = StoreRecorder(store, self.name, self.captured) if store is not None and self.capture else None
        self.watch = LayerObserver(self.name, observer) if observer is not None else None
        self.regional = None
        if regions is not None and any(la.name in regions.grid_of for la in self.layers):
            cross = next(la for la in self.layers if la.name in regions.grid_of)
            self.regional = LayerRegions(cross.name, regions, getattr(cross.ops, "text_first", None))
        self.signature = inspect.signature(original.__call__)
        # diffusers filters cross_attention_kwargs by the processor's signature: expose the original's.
        self.__dict__["__call__"] = _SignatureProxy(self, self.signature)

    def _arguments(self, attn, args, kwargs) -> dict:
        """The call's arguments by name, as the original processor would read them (FLUX passes them by position)."""
        bound = self.signature.bind_partial(attn, *args, **kwargs).arguments
        bound.pop("self", None)
        extra = bound.pop("kwargs", None) or {}
        return {**bound, **extra}

    def __call__(self, attn, *args: Any, **kwargs: Any) -> Any:
        """Pick the layer's form, compute its attention with the form and hand the probabilities to this layer's
        recorder (guidance pass), editors and observer (ordinary forward); with none of them at work, the layer's
        own processor runs alone."""
        form: AttentionForm = self.layer.ops

        def own() -> Any:
            return self.original(attn, *args, **kwargs)

        if self.regional is not None:
            return self._regional(form, attn, args, kwargs, own)
        if self.store is not None and self.store.active:
            if self.recorder is None:
                return own()
            return self._record(form, attn, self._arguments(attn, args, kwargs), own)
        edits = ActiveEdits.of(self.name, self.editors)
        watch = self.watch if self.watch is not None and self.watch.active else None
        if edits is None and watch is None:
            return own()
        named = self._arguments(attn, args, kwargs)
        if edits is not None:
            return self._edit(form, attn, named, own, edits, watch)
        self._observe(form, attn, named)
        return own()

    def _record(self, form: AttentionForm, attn, named: dict, own: Callable[[], Any]):
        """Job 1, a guidance pass: the maps the guidance reads, into the store."""
        recorder = self.recorder
        assert recorder is not None  # only captured layers record, and a processor without a store captures none
        if form.explicit_scores:
            return _explicit(form, attn, named, on_probs=recorder.record)
        recorder.record_maps(form.maps(attn, named, recorder.n_image, recorder.kinds, recorder.columns))
        return own()

    def _edit(
        self,
        form: AttentionForm,
        attn,
        named: dict,
        own: Callable[[], Any],
        edits: ActiveEdits,
        watch: LayerObserver | None,
    ):
        """Job 2, the ordinary forward: the layer's output with the editors' probabilities (observed, if ``watch``)."""
        if form.explicit_scores:
            on_probs = watch.record_explicit if watch is not None else None
            return _explicit(form, attn, named, on_probs=on_probs, on_scores=edits.edit)
        observe = watch.record_edited if watch is not None else None
        return form.edited(attn, named, edits.n_image, own, edits.edit, observe)

    @torch.no_grad()
    def _observe(self, form: AttentionForm, attn, named: dict) -> None:
        """Job 3, the ordinary forward: the conditional probabilities, recorded beside the layer's own processor."""
        watch = self.watch
        assert watch is not None  # only an active observer observes
        if form.observes:
            probs = form.observe(
                attn,
                named["hidden_states"],
                named.get("encoder_hidden_states"),
                named.get("attention_mask"),
                watch.cond_half,
            )
            watch.record_conditional(probs, attn.heads)
            return
        maps = form.maps(attn, named, watch.n_image, {"cross"}, watch.columns)
        watch.record_cross(maps["cross"][0])  # (images, heads, queries, columns)

    def _regional(self, form: AttentionForm, attn, args, kwargs, own: Callable[[], Any]):
        """Regional prompting in this layer, in any forward: the layer's own processor with its attention call
        replaced (:class:`~.regional.RegionalSDPA`); where a recorder, the observer or a probe wants maps, the
        probabilities the regional attention uses (explicit cross-attention: from the scores; joint layers: from
        the queries and keys of the replaced call)."""
        from .regional import RegionalSDPA, regional_text_probs

        regional = self.regional
        assert regional is not None
        guidance = self.store is not None and self.store.active
        recorder = self.recorder if guidance else None
        watch = None if guidance or self.watch is None or not self.watch.active else self.watch
        probe = regional.regions.probe
        layout, beta = regional.layout, regional.beta
        negative = regional.negative_forward(guidance)

        def n_plain(batch: int) -> int:
            return batch if negative else regional.n_plain(batch, guidance)

        if negative or (recorder is None and watch is None and probe is None):
            padded = negative and regional.regions.padded_negative
            mode = RegionalSDPA(layout, beta, n_plain, regional.regions.kernel, padded=padded)
            with mode:
                out = own()
            if mode.calls == 0:  # nothing regional happened: was that right for this call?
                _check_caught(mode, attn, self._arguments(attn, args, kwargs))
            return out
        if form.explicit_scores:
            return self._regional_explicit(form, attn, self._arguments(attn, args, kwargs), guidance, recorder, watch)
        seen: list = []
        mode = RegionalSDPA(layout, beta, n_plain, regional.regions.kernel, lambda *qk: seen.append(qk))
        with mode:
            out = own()
        if mode.calls == 0:  # nothing regional happened: was that right for this call?
            _check_caught(mode, attn, self._arguments(attn, args, kwargs))
        if not seen:  # a forward at another text length (a sequential negative branch): nothing to record
            return out
        q, k, scale = seen[0]
        if probe is not None:
            with torch.no_grad():
                probe(self.name, regional_text_probs(q, k, layout, beta, scale, None)[0])
        columns = recorder.columns if recorder is not None else watch.columns if watch is not None else None
        if recorder is not None:
            maps: dict = {"cross": regional_text_probs(q, k, layout, beta, scale, columns)}
            if "self" in recorder.kinds:
                img = layout.tables.image_rows
                maps["self"] = image_probs(q.index_select(2, img), k.index_select(2, img), scale)
            recorder.record_maps(maps)
        if watch is not None:
            with torch.no_grad():
                watch.observer.record_heads(regional_text_probs(q, k, layout, beta, scale, columns)[0], self.name)
        return out

    def _regional_explicit(self, form: AttentionForm, attn, named: dict, guidance: bool, recorder, watch):
        """A cross-attention layer's regional output through explicit probabilities (from its scores), recorded
        (base columns) and probed (every column) for the conditional images."""
        from .regional import regional_probs

        regional = self.regional
        assert regional is not None
        probe, layout, beta = regional.regions.probe, regional.layout, regional.beta
        n_plain: list[int] = []

        def on_scores(scores, heads):
            n_plain[:] = [regional.n_plain(scores.shape[0] // heads, guidance)]
            return regional_probs(scores, heads, layout, beta, n_plain[0])

        def on_probs(probs, heads):
            cond = probs.view(-1, heads, *probs.shape[1:])[n_plain[0] :]
            if probe is not None:
                probe(self.name, cond.detach())
            if recorder is not None:
                recorder.record(cond.flatten(0, 1), heads)
            if watch is not None:
                watch.observer.record(cond.flatten(0, 1), heads, self.name)

        return _explicit(form, attn, named, on_probs=on_probs, on_scores=on_scores)


def _check_caught(mode, attn, named: dict) -> None:
    """A layer called with the joined text (base and sub-prompts) must have made a regional attention call; one
    whose processor never reached ``F.scaled_dot_product_attention`` at the regional shapes (a flash, sage or
    xformers backend, a processor of the user's, a layout the regional rule does not know) cannot be masked: say
    so rather than run unmasked. A call at another text length (a negative branch run as its own forward) is
    the plain model's and needs nothing."""
    layout = mode.layout
    context, hidden = named.get("encoder_hidden_states"), named.get("hidden_states")
    if torch.is_tensor(context):
        joined = context.ndim == 3 and context.shape[1] == layout.text_len
    else:
        joined = torch.is_tensor(hidden) and hidden.ndim == 3 and hidden.shape[1] == layout.n_queries
    if mode.calls == 0 and (joined or mode.other_calls == 0):
        raise UnsupportedPipelineError(
            f"regions: the attention of {type(attn).__name__} did not reach torch's scaled_dot_product_attention "
            "with the regional shapes, so its regional mask cannot be applied; use the native attention "
            '(pipe.transformer.set_attention_backend("native"), or drop xformers/flash processors)'
        )


def _explicit(form: AttentionForm, attn, named: dict, on_probs=None, on_scores=None) -> torch.Tensor:
    """``form.explicit`` on the call's arguments by name."""
    return form.explicit(
        attn,
        named["hidden_states"],
        named.get("encoder_hidden_states"),
        named.get("attention_mask"),
        named.get("temb"),
        on_probs=on_probs,
        on_scores=on_scores,
    )


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
    regions=None,
) -> Iterator[dict]:
    """Install :class:`CaptureProcessor` on the processors of the store's, the edited and the observed layers only
    (``layers``: the adapter's description of every capturable layer); restore every original processor on exit,
    also when an error is raised. ``regions``: a :class:`~attncontrol.controls.regions.PreparedRegions` whose layers
    get its regional attention."""
    saved = dict(denoiser.attn_processors)
    by_name = {layer.name: layer for layer in layers}
    captured = {layer.name for layer in store.layers} if store is not None else set()
    editors = editors or {}
    observed = set(observer.layers) if observer is not None else set()
    regional = set(regions.layers) if regions is not None else set()
    wanted = captured | set(editors) | observed | regional
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
            proc,
            store,
            entries,
            captured & names,
            [e for n in names for e in editors.get(n, ())],
            observer if observed & names else None,
            regions if regional & names else None,
        )
    try:
        denoiser.set_attn_processor(dict(procs))  # set_attn_processor pops from the dict it is given
        yield procs
    finally:
        denoiser.set_attn_processor(dict(saved))
        if store is not None:
            store.active = False
            store.reset()
