"""Rotary joint attention in "parallel" transformer blocks (ViT-22B style): the attention's q/k/v projection is one
slice of a projection fused with the MLP's input, and one output projection maps the concatenated [attention;
MLP] outputs. The other blocks of such a model (separate image and text projections, text passed apart) are the
ordinary rotary joint layers of :class:`~.joint.RotaryJointAttention`, which this form also serves.

The queries and keys are read as the layer's own processor computes them: the fused projection split by the
ratio of its q/k/v part to its MLP part, per-head RMS norms, rotary embeddings on [text; image]. An edited
attention's change ``(P_edit - P) @ V`` of the image tokens goes through the attention's columns of the fused
output projection (the MLP's columns see no change; the projection is linear, so its bias cancels), and is
added to the image part of the layer's output, before the block's gate and residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .joint import RotaryJointAttention

FUSED = "to_qkv_mlp_proj"  # the fused q/k/v + MLP-input projection of a parallel block's attention


def _qkv_of(attn, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (batch, tokens, heads, head dim) from the fused projection, split as the layer's processor splits it:
    its first ``3 * inner_dim`` of ``3 * inner_dim + mlp_hidden_dim * mlp_mult_factor`` columns, scaled to the
    columns this rank holds."""
    fused = getattr(attn, FUSED)(hidden)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local = fused.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    q, k, v = fused[..., :local].chunk(3, dim=-1)
    return (
        q.unflatten(-1, (-1, attn.head_dim)),
        k.unflatten(-1, (-1, attn.head_dim)),
        v.unflatten(-1, (-1, attn.head_dim)),
    )


class ParallelRotaryJointAttention(RotaryJointAttention):
    """Rotary joint attention, text first, whose single-sequence layers are parallel blocks (see the module
    docstring); its other layers are read as :class:`~.joint.RotaryJointAttention` reads them."""

    @staticmethod
    def is_parallel(attn) -> bool:
        return hasattr(attn, FUSED)

    def query_key(self, attn, args: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not self.is_parallel(attn):
            return super().query_key(attn, args)
        from diffusers.models.embeddings import apply_rotary_emb

        q_raw, k_raw, _ = _qkv_of(attn, args["hidden_states"])
        q, k = attn.norm_q(q_raw), attn.norm_k(k_raw)
        rotary = args.get("image_rotary_emb")
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), 0  # text and image in one sequence: the caller splits them

    def values(self, attn, args: dict) -> torch.Tensor:
        if not self.is_parallel(attn):
            return super().values(attn, args)
        return _qkv_of(attn, args["hidden_states"])[2].transpose(1, 2)

    def add_image_delta(self, attn, out, delta: torch.Tensor, img: slice):
        if not self.is_parallel(attn):
            return super().add_image_delta(attn, out, delta, img)
        weight = attn.to_out.weight[:, : delta.shape[-1]]  # the attention's columns of [attention; MLP]
        out = out.clone()
        out[:, img] = out[:, img] + F.linear(delta, weight)
        return out


PARALLEL_ROTARY_JOINT = ParallelRotaryJointAttention()
