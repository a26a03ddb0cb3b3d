"""The capture processor, layer finding (by module name and resolution) and install/restore."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..store import AttentionStore, AttnLayer, EarlyExit

_NAME = re.compile(
    r"^(?P<place>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?\.attentions\.(?P<attn>\d+)"
    r"\.transformer_blocks\.(?P<tb>\d+)\.(?P<which>attn1|attn2)\.processor$"
)
_PLACE = {"down_blocks": ("down", 0), "mid_block": ("mid", 1), "up_blocks": ("up", 2)}


def find_attention_layers(unet) -> list[AttnLayer]:
    """Every self-/cross-attention layer of a ``UNet2DConditionModel``, by module name, in execution order.

    ``level`` is the number of 2x downsamplings before the layer: down block k is at level k, the mid
    block at the lowest level, up block k at level ``len(down_blocks) - 1 - k``.
    """
    n_levels = len(unet.config.down_block_types)
    found = []
    for name in unet.attn_processors:
        m = _NAME.match(name)
        if m is None:
            continue  # not a transformer block attention (e.g. a plain attention block): never captured
        place, rank = _PLACE[m["place"]]
        block = int(m["block"]) if m["block"] is not None else 0
        level = {"down": block, "mid": n_levels - 1, "up": n_levels - 1 - block}[place]
        key = (rank, block, int(m["attn"]), int(m["tb"]), 0 if m["which"] == "attn1" else 1)
        found.append((key, name, "self" if m["which"] == "attn1" else "cross", place, level))
    found.sort()
    return [AttnLayer(name, kind, place, level, order) for order, (_, name, kind, place, level) in enumerate(found)]


def layer_resolution(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """(rows, cols) of the feature map after ``level`` stride-2 downsamplings (k=3, padding 1: ceil halving)."""
    rows, cols = latent_hw
    for _ in range(level):
        rows, cols = (rows + 1) // 2, (cols + 1) // 2
    return rows, cols


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
        self, original, store: AttentionStore | None, name: str, capture: bool = True, editors=(), observer=None
    ):
        self.original = original
        self.store = store
        self.name = name
        self.capture = capture and store is not None
        self.editors = list(editors)
        self.observer = observer
        # diffusers filters cross_attention_kwargs by the processor's signature: expose the original's.
        self.__dict__["__call__"] = _SignatureProxy(self, inspect.signature(original.__call__))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.store is not None and self.store.active:
            if self.capture:
                return self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        else:
            editors = [e for e in self.editors if e.active]
            if editors:
                return self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, editors)
            if self.observer is not None and self.observer.active:
                self._observe(attn, hidden_states, encoder_hidden_states, attention_mask)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    @torch.no_grad()
    def _observe(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> None:
        # The conditional half's probabilities only, computed beside the original processor (a few small layers).
        obs = self.observer
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:  # (batch * heads, 1, keys), batch-major: its halves follow the batch's
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
            attention_mask = obs.cond_half(attention_mask)
        hidden_states, context = obs.cond_half(hidden_states), obs.cond_half(context)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        obs.record(attn.get_attention_scores(query, key, attention_mask), attn.heads)

    def _explicit(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, editors=()) -> torch.Tensor:
        # diffusers' AttnProcessor, with the probabilities recorded (guidance) or rewritten (editors).
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        if editors:
            scores = torch.baddbmm(
                torch.zeros(1, 1, 1, dtype=torch.float32, device=query.device)
                if attention_mask is None
                else attention_mask.float(),
                query.float(),
                key.float().transpose(-1, -2),
                beta=0 if attention_mask is None else 1,
                alpha=attn.scale,
            )
            probs = None
            for editor in editors:
                probs = editor.edit(self.name, scores, attn.heads)
            probs = probs.to(query.dtype)
            if self.observer is not None and self.observer.active:
                per_image = probs.view(batch_size, attn.heads, *probs.shape[1:])
                self.observer.record(self.observer.cond_half(per_image).flatten(0, 1), attn.heads)
        else:
            probs = attn.get_attention_scores(query, key, attention_mask)
            self.store.record(self.name, probs, attn.heads)
            if self.store.early_exit and self.name == self.store.last_layer:
                raise EarlyExit  # nothing after this layer feeds the loss
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class _SignatureProxy:
    """Stands in for ``processor.__call__`` when diffusers inspects it; calling it calls the processor."""

    def __init__(self, processor: CaptureProcessor, signature: inspect.Signature):
        self._processor = processor
        self.__signature__ = signature

    def __call__(self, *args, **kwargs):
        return CaptureProcessor.__call__(self._processor, *args, **kwargs)


@contextmanager
def capture_layers(
    unet, store: AttentionStore | None, editors: dict[str, list] | None = None, observer=None
) -> Iterator[dict]:
    """Install :class:`CaptureProcessor` on the store's, the edited and the observed layers only; restore every
    original processor on exit, also when an error is raised."""
    saved = dict(unet.attn_processors)
    captured = {layer.name for layer in store.layers} if store is not None else set()
    editors = editors or {}
    observed = set(observer.layers) if observer is not None else set()
    wanted = captured | set(editors) | observed
    missing = wanted - saved.keys()
    if missing:
        raise ValueError(f"layers not in this UNet: {sorted(missing)}")
    procs = {
        name: CaptureProcessor(
            proc, store, name, name in captured, editors.get(name, ()), observer if name in observed else None
        )
        if name in wanted
        else proc
        for name, proc in saved.items()
    }
    try:
        unet.set_attn_processor(dict(procs))  # set_attn_processor pops from the dict it is given
        yield procs
    finally:
        unet.set_attn_processor(dict(saved))
        if store is not None:
            store.active = False
            store.reset()
