"""Single-stream attention over one sequence of padded segments: [image tokens, image padding, text tokens, text
padding], each segment padded to a multiple of ``multiple`` positions with learned pad tokens that the layer
attends to, per-head RMS norms on q and k, complex rotary embeddings on both, and a key-padding mask where the
items of a batch have different lengths (a batch of prompts with different text lengths).

The layout, per batch item ``b`` with ``n`` image tokens and a text part of ``T_b`` positions:
``[0, n)`` image queries/keys; ``[n, X)`` image padding, ``X = ceil(n / multiple) * multiple``; ``[X, X + T_b)``
the text part (the text's tokens, then its pad tokens); then positions the mask hides (zero probability).

Maps (exact, without the (L x L) matrix): "cross" is image query -> text-part key ``X + j`` of the one softmax
over every unmasked key (image padding and text padding included, as the layer has them), zero for slots ``j`` an
item does not have; "self" is the image -> image part renormalised over the ``n`` image keys. The masks such a
layer gets are key-padding masks (each item's valid keys are a prefix), so each item's log-sum-exp is the fused
:func:`~.joint.logsumexp_keys` over its own prefix: exact, and no masked kernel is needed.

Batches whose conditional branch comes first (``[conditional; unconditional]`` in one forward) are shown to the
capture processor as ``[unconditional; conditional]`` (the order it reads), when ``pairs`` says how many images a
branch holds; a forward of the conditional branch alone while ``pairs`` is set (a step where such a pipeline skips
its unconditional branch) is shown doubled, so its second half is still the conditional one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .complex_rotary import rotate_pairs
from .joint import JointAttention, image_probs, logsumexp_keys


def prefix_lengths(mask: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Each item's number of valid keys, from a (batch, length) boolean key-padding mask (None: all valid)."""
    if mask is None:
        return [length] * batch
    mask = mask.reshape(batch, length).bool()
    counts = mask.sum(-1)
    prefix = torch.arange(length, device=mask.device)[None] < counts[:, None]
    if not bool(torch.equal(prefix, mask)):
        raise NotImplementedError("this attention form reads key-padding masks only (valid keys first)")
    return [int(c) for c in counts.tolist()]


class SegmentedJointAttention(JointAttention):
    """The form of a single-stream layer over [image; image padding; text; text padding] (see the module
    docstring). ``multiple``: the segment padding multiple. ``pairs``: images per classifier-free-guidance branch
    of a batch that holds the conditional branch first (None: no such batch)."""

    text_first = False

    def __init__(self, multiple: int):
        self.multiple = int(multiple)
        self.pairs: int | None = None

    def padded(self, n: int) -> int:
        """``n`` positions padded to the segment multiple."""
        return -(-n // self.multiple) * self.multiple

    def text_start(self, n_image: int) -> int:
        return self.padded(n_image)

    def query_key(self, attn, args: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(q, k) as (B, H, L, D) exactly as the layer computes them (projections, q/k norms, complex rotary
        embedding in float32, cast back); the text length is not known here (0)."""
        hidden = args["hidden_states"]
        q = attn.to_q(hidden).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(hidden).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        freqs = args.get("freqs_cis")
        if freqs is not None:
            q, k = rotate_pairs(q, freqs), rotate_pairs(k, freqs)
        return q.transpose(1, 2), k.transpose(1, 2), 0

    def values(self, attn, args: dict) -> torch.Tensor:
        return attn.to_v(args["hidden_states"]).unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    def _lse(self, q: torch.Tensor, k: torch.Tensor, lengths: list[int], start: int, scale: float):
        """(B, H, Nq) log-sum-exp of each item's queries over its keys ``[start, length_b)``."""
        out = []
        for b, length in enumerate(lengths):
            if length <= start:
                out.append(torch.full_like(q[b : b + 1, :, :, 0], -math.inf))
                continue
            out.append(logsumexp_keys(q[b : b + 1], k[b : b + 1, :, start:length], scale))
        return torch.cat(out, dim=0)

    def maps(self, attn, args: dict, n_image: int, kinds: set[str], columns: torch.Tensor | None):
        """``{"cross": (P, mass), "self": P}`` (heads not pooled); cross columns index the text part."""
        args, _ = self._cfg_order(args)
        q, k, _ = self.query_key(attn, args)
        b, _, length, _ = q.shape
        lengths = prefix_lengths(args.get("attention_mask"), b, length)
        x0, scale = self.text_start(n_image), 1.0 / math.sqrt(q.shape[-1])
        q_img = q[:, :, :n_image]
        out: dict[str, object] = {}
        if "cross" in kinds:
            cols = columns if columns is not None else torch.arange(length - x0, device=q.device)
            cols = cols.to(q.device)
            lse = self._lse(q_img, k, lengths, 0, scale)
            valid = torch.tensor(lengths, device=q.device)[:, None] > (x0 + cols)[None]  # (B, C)
            k_cols = k[:, :, (x0 + cols).clamp(max=length - 1)]
            logits = (q_img @ k_cols.transpose(-1, -2)) * scale - lse[..., None].to(q.dtype)
            probs = torch.where(valid[:, None, None, :], torch.exp(logits), torch.zeros_like(logits))
            mass = torch.exp(self._lse(q_img, k, lengths, x0, scale) - lse)
            out["cross"] = (probs, mass)
        if "self" in kinds:
            out["self"] = image_probs(q_img, k[:, :, :n_image], scale)
        return out

    def edited(self, attn, args: dict, n_image: int, original, edit, observe=None):
        """The layer's output with the image queries' probabilities rewritten by ``edit(scores, heads,
        text_offset)``: masked keys score -inf; ``(P_edit - P) @ V`` goes through the output projection (no bias
        term: the change of a linear map) into the image rows of the layer's own output."""
        args, restore = self._cfg_order(args)
        q, k, _ = self.query_key(attn, args)
        b, heads, length, _ = q.shape
        lengths = prefix_lengths(args.get("attention_mask"), b, length)
        x0, scale = self.text_start(n_image), 1.0 / math.sqrt(q.shape[-1])
        scores = (q[:, :, :n_image].float() @ k.float().transpose(-1, -2)) * scale
        hidden = torch.arange(length, device=q.device)[None] >= torch.tensor(lengths, device=q.device)[:, None]
        scores = scores.masked_fill(hidden[:, None, None, :], -math.inf)
        probs0 = torch.softmax(scores, dim=-1)
        probs = edit(scores.flatten(0, 1), heads, x0).view_as(probs0)
        if observe is not None:
            observe(probs[..., x0:])
        delta = ((probs - probs0) @ self.values(attn, args).float()).to(q.dtype)
        delta = delta.transpose(1, 2).reshape(b, n_image, -1)
        proj = attn.to_out[0]
        change = proj(delta) - (proj.bias if getattr(proj, "bias", None) is not None else 0)
        out = original().clone()
        out[:, :n_image] = out[:, :n_image] + restore(change)
        return out

    def _cfg_order(self, args: dict) -> tuple[dict, Callable[[torch.Tensor], torch.Tensor]]:
        """The call's arguments in [unconditional; conditional] order (see the module docstring), and the map from
        a batch-first tensor in that order back to the layer's own batch."""
        n = self.pairs
        batch = args["hidden_states"].shape[0]
        if n is None or batch not in (n, 2 * n):
            return args, _same
        order = [*range(n, 2 * n), *range(n)] if batch == 2 * n else [*range(n), *range(n)]
        out = dict(args)
        for key in ("hidden_states", "attention_mask", "freqs_cis"):
            if torch.is_tensor(out.get(key)):
                out[key] = out[key][order]
        back = order if batch == 2 * n else list(range(n, 2 * n))
        return out, lambda x: x[back]


def _same(x: torch.Tensor) -> torch.Tensor:
    return x
