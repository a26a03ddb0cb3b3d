"""Image->text probabilities of a joint attention (image and text tokens in one softmax), exactly and without the
(N+M)^2 matrix.

In a joint layer every image query attends to all N image keys and M text keys, so an image->text probability
needs the softmax denominator over all N + M keys. We get it as a log-sum-exp from a fused attention kernel
(:func:`logsumexp_keys`, an autograd function with an exact backward written with two more fused calls) and
form ``P = exp(q_img . k_text * scale - lse)`` only for the text columns that are needed. Memory: O(N * columns)
per head instead of O((N + M)^2).

The ops classes here read the layer's queries and keys as its own processor computes them (projections, q/k
norms, rotary embeddings) and leave the layer's output to the layer's own processor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .form import AttentionForm


def _lse_forward(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """log sum_j exp(scale * q_i . k_j) for every query: (B, H, Nq), float32 or wider."""
    if q.device.type == "cpu":
        op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if op is not None:
            return op(q, k, k, 0.0, False, attn_mask=None, scale=scale)[1]
    elif q.device.type == "cuda":
        try:
            out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, k, None, True, scale=scale)
            return out[1][..., : q.shape[-2]]
        except (RuntimeError, NotImplementedError):
            pass
    # exact fallback: chunks of queries, never more than chunk x keys logits at once
    dtype = torch.promote_types(q.dtype, torch.float32)
    parts = [
        torch.logsumexp((q[..., s : s + chunk, :].to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale, dim=-1)
        for s in range(0, q.shape[-2], chunk)
    ]
    return torch.cat(parts, dim=-1)


class _LogSumExpKeys(torch.autograd.Function):
    """lse(q, k) with the exact backward: d lse_i / d q_i = scale * softmax_i @ K (an attention with values K);
    d lse / d K = scale * P^T (g * Q) (the value-gradient of an attention with output-gradient g * Q)."""

    @staticmethod
    def forward(ctx, q, k, scale):
        ctx.save_for_backward(q, k)
        ctx.scale = scale
        return _lse_forward(q, k, scale)

    @staticmethod
    def backward(ctx, g):
        q, k = ctx.saved_tensors
        scale = ctx.scale
        g = g.to(q.dtype)
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dq = scale * g[..., None] * F.scaled_dot_product_attention(q, k, k, scale=scale)
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                v = torch.zeros_like(k, requires_grad=True)
                out = F.scaled_dot_product_attention(q.detach(), k.detach(), v, scale=scale)
                (dk,) = torch.autograd.grad(out, [v], grad_outputs=g[..., None] * q)
            dk = scale * dk
        return dq, dk, None


def logsumexp_keys(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, Nq) log-sum-exp of ``scale * q . k`` over all keys, differentiable, without the score matrix."""
    return _LogSumExpKeys.apply(q, k, scale)


def text_probs(q_img, k, text_start: int, columns: torch.Tensor, scale: float, text_len: int):
    """Image->text probabilities of the full softmax (all keys), for the text ``columns`` only, and each query's
    total mass on all ``text_len`` text keys: ``(P (B, H, N, C), mass (B, H, N))``."""
    k_cols = k[:, :, text_start + columns]
    lse = logsumexp_keys(q_img, k, scale)
    probs = torch.exp((q_img @ k_cols.transpose(-1, -2)) * scale - lse[..., None].to(q_img.dtype))
    mass = torch.exp(logsumexp_keys(q_img, k[:, :, text_start : text_start + text_len], scale) - lse)
    return probs, mass


def image_probs(q_img, k_img, scale: float) -> torch.Tensor:
    """Image->image probabilities, softmax over the image keys: (B, H, N, N) (for self-attention terms)."""
    return torch.softmax((q_img @ k_img.transpose(-1, -2)) * scale, dim=-1)


class JointAttention(AttentionForm):
    """Queries and keys of an MMDiT joint layer: separate image (to_q/to_k) and text (add_q_proj/add_k_proj)
    projections, optional RMS norms on each, image tokens first (SD3 / SD3.5). Also the image-only layers
    (SD3.5's second, image-only attention of a block: no text projections)."""

    # no explicit (N+M)^2 matrix: maps() and edited() work beside the layer's own processor, maps() observes
    explicit_scores = False
    observes = False
    text_first = False

    def heads_view(self, attn, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    def query_key(self, attn, args: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(q, k) of all tokens as (B, H, L, D), and the number of text tokens M (0 for image-only layers)."""
        hidden, context = args["hidden_states"], args.get("encoder_hidden_states")
        q, k = self.heads_view(attn, attn.to_q(hidden)), self.heads_view(attn, attn.to_k(hidden))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if context is None:
            return q, k, 0
        cq, ck = self.heads_view(attn, attn.add_q_proj(context)), self.heads_view(attn, attn.add_k_proj(context))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        return torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), context.shape[1]

    def split(self, length: int, text_len: int) -> tuple[slice, int]:
        """(image token slice, first text position) in the joint sequence."""
        n_img = length - text_len
        return (slice(text_len, length), 0) if self.text_first else (slice(0, n_img), n_img)

    def maps(self, attn, args: dict, n_image: int, kinds: set[str], columns: torch.Tensor | None):
        """The maps this layer gives for ``kinds``: ``{"cross": (P, mass), "self": P}`` (heads not pooled)."""
        q, k, text_len = self.query_key(attn, args)
        if text_len == 0 and q.shape[2] != n_image:  # a single-stream block: text and image in one sequence
            text_len = q.shape[2] - n_image
        img, text_start = self.split(q.shape[2], text_len)
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = {}
        if "cross" in kinds and text_len:
            cols = columns if columns is not None else torch.arange(text_len, device=q.device)
            out["cross"] = text_probs(q[:, :, img], k, text_start, cols.to(q.device), scale, text_len)
        if "self" in kinds:
            out["self"] = image_probs(q[:, :, img], k[:, :, img], scale)
        return out

    def values(self, attn, args: dict) -> torch.Tensor:
        """Values of all tokens as (B, H, L, D), in the order of :meth:`query_key`."""
        hidden, context = args["hidden_states"], args.get("encoder_hidden_states")
        v = self.heads_view(attn, attn.to_v(hidden))
        if context is None:
            return v
        return torch.cat([v, self.heads_view(attn, attn.add_v_proj(context))], dim=2)

    def edited(self, attn, args: dict, n_image: int, original, edit, observe=None):
        """The layer's output with the image queries' probabilities rewritten by ``edit(scores, heads,
        text_offset)`` (explicit scores for the image queries only; text queries keep the layer's own attention).
        The change ``(P_edit - P) @ V`` is added to the image part of the layer's own output, through the output
        projection where the layer applies one."""
        q, k, text_len = self.query_key(attn, args)
        if text_len == 0 and q.shape[2] != n_image:
            text_len = q.shape[2] - n_image
        img, text_start = self.split(q.shape[2], text_len)
        scale = 1.0 / math.sqrt(q.shape[-1])
        b, heads = q.shape[:2]
        scores = (q[:, :, img].float() @ k.float().transpose(-1, -2)) * scale
        probs0 = torch.softmax(scores, dim=-1)
        probs = edit(scores.flatten(0, 1), heads, text_start).view_as(probs0)
        if observe is not None:
            observe(probs[..., text_start : text_start + text_len])
        delta = ((probs - probs0) @ self.values(attn, args).float()).to(q.dtype)  # (B, H, N, D)
        delta = delta.transpose(1, 2).reshape(b, n_image, -1)
        out = original()
        return self.add_image_delta(attn, out, delta, img)

    def add_image_delta(self, attn, out, delta: torch.Tensor, img: slice):
        """Add the (unprojected) change of the image tokens' attention output to the layer's own output."""
        proj = attn.to_out[0]
        change = proj(delta) - (proj.bias if getattr(proj, "bias", None) is not None else 0)
        if isinstance(out, tuple):
            return (out[0] + change, *out[1:])
        return out + change


class RotaryJointAttention(JointAttention):
    """Queries and keys of a FLUX-style joint layer: fused or separate projections, per-head RMS norms, text
    tokens first, rotary position embeddings on all tokens (double-stream blocks get the text separately,
    single-stream blocks get text and image already concatenated)."""

    text_first = True

    def query_key(self, attn, args: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        from diffusers.models.embeddings import apply_rotary_emb

        hidden, context = args["hidden_states"], args.get("encoder_hidden_states")
        if getattr(attn, "fused_projections", False):
            q, k, _ = attn.to_qkv(hidden).chunk(3, dim=-1)
        else:
            q, k = attn.to_q(hidden), attn.to_k(hidden)
        q, k = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim))), attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        text_len = 0
        if context is not None and attn.added_kv_proj_dim is not None:
            if getattr(attn, "fused_projections", False):
                cq, ck, _ = attn.to_added_qkv(context).chunk(3, dim=-1)
            else:
                cq, ck = attn.add_q_proj(context), attn.add_k_proj(context)
            cq = attn.norm_added_q(cq.unflatten(-1, (-1, attn.head_dim)))
            ck = attn.norm_added_k(ck.unflatten(-1, (-1, attn.head_dim)))
            q, k, text_len = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), context.shape[1]
        rotary = args.get("image_rotary_emb")
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), text_len

    def values(self, attn, args: dict) -> torch.Tensor:
        hidden, context = args["hidden_states"], args.get("encoder_hidden_states")
        v = attn.to_qkv(hidden).chunk(3, dim=-1)[2] if getattr(attn, "fused_projections", False) else attn.to_v(hidden)
        v = v.unflatten(-1, (-1, attn.head_dim))
        if context is not None and attn.added_kv_proj_dim is not None:
            cv = (
                attn.to_added_qkv(context).chunk(3, dim=-1)[2]
                if getattr(attn, "fused_projections", False)
                else attn.add_v_proj(context)
            )
            v = torch.cat([cv.unflatten(-1, (-1, attn.head_dim)), v], dim=1)
        return v.transpose(1, 2)

    def add_image_delta(self, attn, out, delta: torch.Tensor, img: slice):
        if isinstance(out, tuple):  # double-stream: (image output after to_out, text output)
            return super().add_image_delta(attn, out, delta, img)
        out = out.clone()  # single-stream: the attention output of [text; image], projected later by the block
        out[:, img] = out[:, img] + delta
        return out


JOINT = JointAttention()
ROTARY_JOINT = RotaryJointAttention()
