"""A joint attention with text tokens first, rotary embeddings given as complex frequencies, and an optional mask
on the text keys.

Its layers (diffusers' ``Attention`` with ``added_kv_proj_dim``) project image and text tokens separately, normalise
each head's queries and keys (RMS norms), rotate them by ``image_rotary_emb = (image freqs, text freqs)``, complex
tensors of shape (tokens, head_dim / 2) applied to adjacent pairs of channels, and run one softmax over
[text; image] keys. A text key mask (``encoder_hidden_states_mask``, (batch, text tokens), true = kept) arrives
when prompts of different lengths share a batch: the masked keys get no probability.

Maps are exact and never form the (N+M)^2 matrix (:func:`~.joint.text_probs`); with a mask, each batch row's
log-sum-exp runs over its kept keys only (:func:`masked_text_probs`).
"""

from __future__ import annotations

import math

import torch

from .joint import JointAttention, image_probs, text_probs


def rotate_pairs(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x`` (B, S, H, D) rotated by complex ``freqs`` ((S, D/2), or (B, S, D/2) per batch row): channels (2i, 2i+1)
    are one complex number, the same rotation for every head. Computed in float32 and cast back, as the layers' own
    processors do."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(-2)).flatten(3).type_as(x)


def masked_text_probs(q_img, k, text_start: int, columns: torch.Tensor, scale: float, key_mask: torch.Tensor):
    """:func:`~.joint.text_probs` where ``key_mask`` (B, M) drops text keys per batch row: a masked column has
    probability 0, and the softmax denominator and the text mass run over the kept keys only."""
    text_len = key_mask.shape[1]
    probs, mass = [], []
    for b in range(q_img.shape[0]):
        valid = key_mask[b]
        keep = torch.ones(k.shape[2], dtype=torch.bool, device=k.device)
        keep[text_start : text_start + text_len] = valid
        # the kept text keys stay contiguous at text_start; a column's place among them
        place = (torch.cumsum(valid.long(), 0) - 1).clamp(min=0)[columns]
        p, m = text_probs(q_img[b : b + 1], k[b : b + 1][:, :, keep], text_start, place, scale, int(valid.sum()))
        probs.append(p * valid[columns].to(p.dtype))
        mass.append(m)
    return torch.cat(probs), torch.cat(mass)


class ComplexRotaryJointAttention(JointAttention):
    """Text first, separate projections, per-head RMS norms, complex rotary frequencies (image, text), an optional
    text key mask (see the module docstring)."""

    text_first = True
    mask_arg = "encoder_hidden_states_mask"

    def _heads(self, attn, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, attn.inner_dim // attn.heads))  # (B, S, H, D)

    def query_key(self, attn, args: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        hidden, context = args["hidden_states"], args["encoder_hidden_states"]
        q, k = self._heads(attn, attn.to_q(hidden)), self._heads(attn, attn.to_k(hidden))
        cq, ck = self._heads(attn, attn.add_q_proj(context)), self._heads(attn, attn.add_k_proj(context))
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_k(k) if attn.norm_k is not None else k
        cq = attn.norm_added_q(cq) if attn.norm_added_q is not None else cq
        ck = attn.norm_added_k(ck) if attn.norm_added_k is not None else ck
        rotary = args.get("image_rotary_emb")
        if rotary is not None:
            image_freqs, text_freqs = rotary
            q, k = rotate_pairs(q, image_freqs), rotate_pairs(k, image_freqs)
            cq, ck = rotate_pairs(cq, text_freqs), rotate_pairs(ck, text_freqs)
        q, k = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), context.shape[1]

    def values(self, attn, args: dict) -> torch.Tensor:
        v = self._heads(attn, attn.to_v(args["hidden_states"]))
        cv = self._heads(attn, attn.add_v_proj(args["encoder_hidden_states"]))
        return torch.cat([cv, v], dim=1).transpose(1, 2)

    def key_mask(self, args: dict) -> torch.Tensor | None:
        """(B, M) bool text key mask, or None when every text key is kept."""
        mask = args.get(self.mask_arg)
        if mask is None:
            return None
        mask = mask.to(torch.bool)
        return None if bool(mask.all()) else mask

    def maps(self, attn, args: dict, n_image: int, kinds: set[str], columns: torch.Tensor | None):
        mask = self.key_mask(args)
        if mask is None:
            return super().maps(attn, args, n_image, kinds, columns)
        q, k, text_len = self.query_key(attn, args)
        img, text_start = self.split(q.shape[2], text_len)
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = {}
        if "cross" in kinds:
            cols = (columns if columns is not None else torch.arange(text_len)).to(q.device)
            out["cross"] = masked_text_probs(q[:, :, img], k, text_start, cols, scale, mask.to(q.device))
        if "self" in kinds:
            out["self"] = image_probs(q[:, :, img], k[:, :, img], scale)
        return out

    def edited(self, attn, args: dict, n_image: int, original, edit, observe=None):
        """:meth:`JointAttention.edited` with the text key mask: masked keys' scores are the float32 minimum, so
        they get no probability before or after ``edit`` (their exponentials underflow to exactly 0)."""
        q, k, text_len = self.query_key(attn, args)
        img, text_start = self.split(q.shape[2], text_len)
        b, heads = q.shape[:2]
        scores = (q[:, :, img].float() @ k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        mask = self.key_mask(args)
        if mask is not None:
            keys = torch.ones(b, k.shape[2], dtype=torch.bool, device=q.device)
            keys[:, text_start : text_start + text_len] = mask.to(q.device)
            scores = scores.masked_fill(~keys[:, None, None, :], torch.finfo(scores.dtype).min)
        probs0 = torch.softmax(scores, dim=-1)
        probs = edit(scores.flatten(0, 1), heads, text_start).view_as(probs0)
        if observe is not None:
            observe(probs[..., text_start : text_start + text_len])
        delta = ((probs - probs0) @ self.values(attn, args).float()).to(q.dtype)
        delta = delta.transpose(1, 2).reshape(b, n_image, -1)
        return self.add_image_delta(attn, original(), delta, img)


COMPLEX_ROTARY_JOINT = ComplexRotaryJointAttention()
