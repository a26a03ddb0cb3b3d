"""Attention as diffusers' classic ``AttnProcessor`` computes it (separate q/k/v projections, optional group
norm, spatial norm and cross norm, q/k norms, an additive key mask, residual and rescale): the layers of the
SD-family denoisers and the cross-attention of the transformers that keep that layout. Used by the capture
processor for the layers where probabilities must be explicit; everywhere else the layer's own processor runs.

q/k norms (``norm_q``/``norm_k``) are applied where their size says: a norm over one head's channels per head, as
diffusers' ``AttnProcessor2_0`` does; a norm over all heads' channels before the heads are split (the
``"rms_norm_across_heads"`` kind, whose processors normalise the projection as a whole).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .form import AttentionForm


def _normed(norm, x: torch.Tensor, heads: int) -> torch.Tensor:
    """``x`` (batch, tokens, heads * head_dim) through a q/k ``norm`` (None: unchanged) where its size fits (see the
    module docstring)."""
    if norm is None:
        return x
    size = getattr(norm, "dim", None) or getattr(norm, "normalized_shape", None)
    if size is not None and int(torch.Size(size).numel()) == x.shape[-1]:
        return norm(x)
    b, n, inner = x.shape
    return norm(x.view(b, n, heads, inner // heads)).reshape(b, n, inner)


class ClassicAttention(AttentionForm):
    """Explicit-probability computation for a classic ``Attention`` layer. Keys are the text tokens (cross) or
    the image tokens (self); every key column is a text position in cross layers."""

    explicit_scores = True  # the layer's output through explicit probabilities: recorded and edited inside it
    observes = True  # the conditional half's probabilities beside the layer's own processor

    @torch.no_grad()
    def observe(self, attn, hidden_states, encoder_hidden_states, attention_mask, cond_half) -> torch.Tensor:
        """Probabilities of the conditional half (``cond_half`` picks it from a batch-first tensor), computed
        beside the layer's own processor (its output is not touched)."""
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:  # (batch * heads, 1, keys), batch-major: its halves follow the batch's
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
            attention_mask = cond_half(attention_mask)
        hidden_states, context = cond_half(hidden_states), cond_half(context)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(_normed(attn.norm_q, attn.to_q(hidden_states), attn.heads))
        key = attn.head_to_batch_dim(_normed(attn.norm_k, attn.to_k(context), attn.heads))
        return attn.get_attention_scores(query, key, attention_mask)

    def explicit(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask,
        temb,
        on_probs: Callable[[torch.Tensor, int], None] | None = None,
        on_scores: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The layer's output through explicit probabilities. ``on_scores(scores, heads)`` may turn the
        float32 pre-softmax scores into the probabilities to use (attention editing); ``on_probs(probs, heads)``
        then sees the probabilities used (and may stop the forward by raising)."""
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
        query = attn.head_to_batch_dim(_normed(attn.norm_q, query, attn.heads))
        key = attn.head_to_batch_dim(_normed(attn.norm_k, key, attn.heads))
        if on_scores is not None:
            scores = torch.baddbmm(
                torch.zeros(1, 1, 1, dtype=torch.float32, device=query.device)
                if attention_mask is None
                else attention_mask.float(),
                query.float(),
                key.float().transpose(-1, -2),
                beta=0 if attention_mask is None else 1,
                alpha=attn.scale,
            )
            probs = on_scores(scores, attn.heads).to(query.dtype)
        else:
            probs = attn.get_attention_scores(query, key, attention_mask)
        if on_probs is not None:
            on_probs(probs, attn.heads)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


CLASSIC = ClassicAttention()
