"""The attention of regional prompting (:mod:`attncontrol.controls.regions`), for any layout, without a score matrix.

A layer's keys are text tokens in segments (the base prompt, then one segment per region's sub-prompt) and, in
joint layers, image tokens, each labelled with the set of boxes it lies in (a bit mask, 0 = background). The rule
(Regional-Prompting-FLUX's, restated in the controls module) decides which keys each query sees:

========================  ===========================================  ==============================
query                     regional branch (weight 1 - beta)            base branch (weight beta)
========================  ===========================================  ==============================
image token in boxes S    sub-prompts of S; image keys sharing a box   base text; every image key
background image token    base text; background image keys             base text; every image key
base text                 base text; every image key                   (not blended)
sub-prompt r              itself; the image keys of box r              (not blended)
========================  ===========================================  ==============================

``image_self="all"`` lets the regional branch's image queries see every image key. Rows that are not the
conditional branch (a batched negative, zero-padded to the regional length) see the base text and every image key:
their own tokens, as the plain model. Cross-attention layers (keys: text only) keep the text columns of the table.

Kernels: ``grouped`` splits the queries into classes with the same key set and runs one unmasked
``scaled_dot_product_attention`` per class over its gathered keys (in their order, so a class whose keys are the
plain model's gives the plain model's attention), plus one for the image queries' base branch: no mask and no
score matrix exist, any fused kernel applies, and the extra memory is one class's gathered keys and values.
``dense`` builds one boolean mask per branch over all queries and keys (the reference, and what a user who wants
one fused call with a mask gets). A mask the layer passes itself (key padding) is honoured by both.

How it reaches the layer: :class:`RegionalSDPA`, a ``TorchFunctionMode`` around the layer's own processor,
catches its ``F.scaled_dot_product_attention`` call (queries, keys and values after the layer's projections,
norms and rotary embeddings) and returns the regional output; the output projection and the rest of the block
are the stock code (diffusers' ``hooks/layer_skip.py:AttentionScoreSkipFunctionMode`` catches SDPA the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedPipelineError
from .joint import logsumexp_keys


@dataclass(frozen=True)
class RegionLayout:
    """One layer's tokens: ``segments`` the text lengths (base first), ``labels`` the image tokens' box bits
    (N,), ``text_first`` True/False for joint layers ([text; image] / [image; text]) and None for cross-attention
    (queries: the image tokens; keys: the text)."""

    segments: tuple[int, ...]
    labels: torch.Tensor
    text_first: bool | None
    image_self: str = "region"

    @property
    def n_image(self) -> int:
        return int(self.labels.numel())

    @property
    def text_len(self) -> int:
        return sum(self.segments)

    @property
    def joint(self) -> bool:
        return self.text_first is not None

    @property
    def text_start(self) -> int:
        return self.n_image if self.text_first is False else 0

    @property
    def image_start(self) -> int:
        return self.text_len if self.text_first else 0

    @property
    def n_keys(self) -> int:
        return self.text_len + (self.n_image if self.joint else 0)

    @property
    def n_queries(self) -> int:
        return self.n_keys if self.joint else self.n_image

    def matches(self, n_queries: int, n_keys: int) -> bool:
        return n_queries == self.n_queries and n_keys == self.n_keys

    @cached_property
    def tables(self) -> RegionTables:
        return RegionTables.of(self)


@dataclass(frozen=True)
class RegionTables:
    """Index tensors of one layout: the query classes of the regional branch (rows, keys), the image queries and
    the keys of the base branch; every index in ascending order."""

    classes: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    image_rows: torch.Tensor
    base_keys: torch.Tensor
    segment_of_key: torch.Tensor  # -1 for image keys, else the text segment (0 = base)
    image_keys_label: torch.Tensor  # (n_keys,) the label of each image key, -1 for text keys
    _dense: dict = field(default_factory=dict, compare=False, repr=False)  # n_queries -> the masks, built once

    @classmethod
    def of(cls, lay: RegionLayout) -> RegionTables:
        device = lay.labels.device
        seg = torch.full((lay.n_keys,), -1, dtype=torch.int64, device=device)
        seg[lay.text_start : lay.text_start + lay.text_len] = torch.repeat_interleave(
            torch.arange(len(lay.segments), device=device), torch.tensor(lay.segments, device=device)
        )
        key_label = torch.full((lay.n_keys,), -1, dtype=torch.int64, device=device)
        if lay.joint:
            key_label[lay.image_start : lay.image_start + lay.n_image] = lay.labels
        image_key = key_label >= 0
        base_keys = ((seg == 0) | image_key).nonzero().flatten()
        image_rows = torch.arange(lay.n_image, device=device) + (lay.image_start if lay.joint else 0)
        classes = []
        for label in torch.unique(lay.labels).tolist():
            rows = image_rows[lay.labels == label]
            if label:
                bits = [r + 1 for r in range(len(lay.segments) - 1) if label >> r & 1]
                text = torch.isin(seg, torch.tensor(bits, device=device))
                near = (key_label & label) != 0
            else:
                text, near = seg == 0, key_label == 0
            image = image_key if lay.image_self == "all" else image_key & near
            classes.append((rows, (text | image).nonzero().flatten()))
        if lay.joint:  # text queries: base -> base + every image key; sub-prompt r -> itself + box r
            text_rows = torch.arange(lay.text_len, device=device) + lay.text_start
            classes.append((text_rows[: lay.segments[0]], base_keys))
            start = lay.text_start + lay.segments[0]
            for r, length in enumerate(lay.segments[1:]):
                rows = torch.arange(start, start + length, device=device)
                keys = (seg == r + 1) | (image_key & ((key_label >> r) & 1).bool())
                classes.append((rows, keys.nonzero().flatten()))
                start += length
        return cls(tuple(classes), image_rows, base_keys, seg, key_label)

    def masks(self, n_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(regional, base) boolean masks (queries, keys): the dense form of the tables (base: image rows only;
        other rows see the base keys, so the base mask is also the plain rows' mask). Built once per size: every
        layer call of a run asks for the same ones."""
        if n_queries not in self._dense:
            self._dense[n_queries] = self._build_masks(n_queries)
        return self._dense[n_queries]

    def _build_masks(self, n_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_keys = self.segment_of_key.numel()
        device = self.segment_of_key.device
        regional = torch.zeros(n_queries, n_keys, dtype=torch.bool, device=device)
        for rows, keys in self.classes:
            regional[rows[:, None], keys[None, :]] = True
        base = torch.zeros(n_queries, n_keys, dtype=torch.bool, device=device)
        base[:, self.base_keys] = True
        return regional, base


def _rows(mask: torch.Tensor | None, dim_rows: torch.Tensor | None, keys: torch.Tensor | None, batch: slice):
    """A layer's own mask (broadcastable to (B, H, Lq, Lk)) restricted to ``batch``, query ``dim_rows`` and
    ``keys`` (None: all)."""
    if mask is None:
        return None
    if mask.ndim == 4 and mask.shape[0] > 1:
        mask = mask[batch]
    if dim_rows is not None and mask.shape[-2] > 1:
        mask = mask.index_select(-2, dim_rows)
    if keys is not None:
        mask = mask.index_select(-1, keys)
    return mask


def _attend(q, k, v, rows, keys, mask, scale, batch: slice):
    """SDPA of query ``rows`` over ``keys`` (index tensors or None for all) of the ``batch`` rows."""
    q, k, v = q[batch], k[batch], v[batch]
    if rows is not None:
        q = q.index_select(2, rows)
    if keys is not None:
        k, v = k.index_select(2, keys), v.index_select(2, keys)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_rows(mask, rows, keys, batch), scale=scale)


def regional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: RegionLayout,
    beta: float,
    n_plain: int = 0,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    kernel: str = "grouped",
) -> torch.Tensor:
    """The layer's attention output (B, H, Lq, Dv) under the regional rule: the first ``n_plain`` batch rows attend
    as the plain model (base text and image keys), the others are the conditional branch, whose image queries get
    ``(1 - beta) * regional + beta * base``. ``beta = 1`` is the plain model for every row but the sub-prompts'."""
    tables = layout.tables
    plain, cond = slice(0, n_plain), slice(n_plain, q.shape[0])
    if n_plain >= q.shape[0]:  # no conditional row: the plain model's attention over its own keys
        return _attend(q, k, v, None, tables.base_keys, attn_mask, scale, plain)
    if kernel == "dense":
        return _dense(q, k, v, tables, beta, n_plain, attn_mask, scale)
    parts = []
    if n_plain:
        parts.append(_attend(q, k, v, None, tables.base_keys, attn_mask, scale, plain))
    out = q.new_zeros(q.shape[0] - n_plain, q.shape[1], q.shape[2], v.shape[-1])
    img = tables.image_rows
    for rows, keys in tables.classes:
        if beta >= 1.0 and torch.isin(rows, img).all():
            continue  # image rows: the base branch alone
        out = out.index_copy(2, rows, _attend(q, k, v, rows, keys, attn_mask, scale, cond))
    if beta > 0.0:
        base = _attend(q, k, v, img, tables.base_keys, attn_mask, scale, cond)
        mixed = base if beta >= 1.0 else (1.0 - beta) * out.index_select(2, img) + beta * base
        out = out.index_copy(2, img, mixed.to(out.dtype))
    parts.append(out)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _bool_with(mask: torch.Tensor, own: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Our boolean mask combined with the layer's own (boolean: and; additive: added, -inf where ours is False)."""
    if own is None:
        return mask
    if own.dtype == torch.bool:
        return mask & own
    return own.to(dtype) + torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _dense(q, k, v, tables: RegionTables, beta: float, n_plain: int, attn_mask, scale) -> torch.Tensor:
    regional, base = tables.masks(q.shape[2])
    own_plain, own_cond = (
        _rows(attn_mask, None, None, slice(0, n_plain)),
        _rows(attn_mask, None, None, slice(n_plain, None)),
    )
    parts = []
    if n_plain:
        mask = _bool_with(base[:1], own_plain, q.dtype)  # every row the same: broadcast
        parts.append(F.scaled_dot_product_attention(q[:n_plain], k[:n_plain], v[:n_plain], attn_mask=mask, scale=scale))
    qc, kc, vc = q[n_plain:], k[n_plain:], v[n_plain:]
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=_bool_with(regional, own_cond, q.dtype), scale=scale)
    if beta > 0.0:  # the base branch of the image rows only: every row of its mask is the same, broadcast
        img = tables.image_rows
        mask = _bool_with(base[:1], _rows(attn_mask, img, None, slice(n_plain, None)), q.dtype)
        mixed = F.scaled_dot_product_attention(qc.index_select(2, img), kc, vc, attn_mask=mask, scale=scale)
        if beta < 1.0:
            mixed = (1.0 - beta) * out.index_select(2, img) + beta * mixed
        out = out.index_copy(2, img, mixed.to(out.dtype))
    parts.append(out)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def regional_text_probs(
    q: torch.Tensor, k: torch.Tensor, layout: RegionLayout, beta: float, scale: float, columns: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image->text probabilities the regional attention uses, for the conditional rows ``q``/``k`` (B, H, L,
    D): ``(P (B, H, N, C), mass (B, H, N))`` for the text ``columns`` (positions in the whole text, base first;
    None: all), ``(1 - beta) P_regional + beta P_base``, each branch normalised over its own keys with a fused
    log-sum-exp (no score matrix), differentiable."""
    tables = layout.tables
    device = q.device
    cols = torch.arange(layout.text_len, device=device) if columns is None else columns.to(device)
    key_cols = cols + layout.text_start
    seg = tables.segment_of_key
    text_keys = (seg >= 0).nonzero().flatten()
    b, h = q.shape[:2]
    wide = torch.promote_types(q.dtype, torch.float32)
    probs = q.new_zeros(b, h, layout.n_image, cols.numel(), dtype=wide)
    mass = q.new_zeros(b, h, layout.n_image, dtype=wide)
    img_rows = tables.image_rows

    def branch(rows: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qr = q.index_select(2, rows)
        lse = logsumexp_keys(qr, k.index_select(2, keys), scale).to(wide)
        logits = (qr.to(wide) @ k.index_select(2, key_cols).to(wide).transpose(-1, -2)) * scale
        allowed = torch.isin(key_cols, keys)
        p = torch.exp(logits - lse[..., None]) * allowed
        texts = keys[torch.isin(keys, text_keys)]
        m = torch.exp(logsumexp_keys(qr, k.index_select(2, texts), scale).to(wide) - lse) if texts.numel() else lse * 0
        return p, m

    if beta < 1.0:
        for rows, keys in tables.classes:
            if not torch.isin(rows, img_rows).all():
                continue  # text queries give no image map
            p, m = branch(rows, keys)
            at = rows - img_rows[0]
            probs = probs.index_copy(2, at, (1.0 - beta) * p)
            mass = mass.index_copy(2, at, (1.0 - beta) * m)
    if beta > 0.0:
        p, m = branch(img_rows, tables.base_keys)
        probs, mass = probs + beta * p, mass + beta * m
    return probs.to(q.dtype), mass.to(q.dtype)


class RegionalSDPA(TorchFunctionMode):
    """Around one call of a layer's own processor: its ``F.scaled_dot_product_attention`` call, when its shapes are
    the layout's, returns :func:`regional_attention`; any other call (a negative forward at the base length, an
    image-only attention) runs unchanged. ``on_qk(q, k, scale)`` (optional) sees the conditional rows' queries and
    keys of the regional call (to read maps). ``calls``: how many regional calls were made. ``n_plain(batch)`` says
    how many leading rows are a batched negative branch; all of them: a negative branch run as its own forward,
    whose call runs unchanged (``padded``: zero-padded to the joined text, it attends to its base tokens only)."""

    def __init__(
        self, layout: RegionLayout, beta: float, n_plain, kernel: str = "grouped", on_qk=None, padded: bool = False
    ):
        super().__init__()
        self.padded = padded  # a negative forward zero-padded to the joined text: its own (base) tokens only
        self.layout = layout
        self.beta = beta
        self.n_plain = n_plain  # batch -> number of leading plain rows
        self.kernel = kernel
        self.on_qk = on_qk
        self.calls = 0
        self.other_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args)) | kwargs
        q, k, v = bound["query"], bound["key"], bound["value"]
        if q.ndim != 4 or not self.layout.matches(q.shape[2], k.shape[2]) or bound.get("is_causal"):
            self.other_calls += 1
            return func(*args, **kwargs)
        if k.shape[1] != q.shape[1]:
            raise UnsupportedPipelineError("regions: grouped-query attention (fewer key heads) is not supported")
        scale = bound.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        n_plain = self.n_plain(q.shape[0])
        self.calls += 1
        if n_plain >= q.shape[0] and not self.padded:  # a negative run as its own forward: its tokens, unmasked
            return func(*args, **kwargs)
        if self.on_qk is not None:
            self.on_qk(q[n_plain:], k[n_plain:], scale)
        return regional_attention(
            q, k, v, self.layout, self.beta, n_plain, bound.get("attn_mask"), bound.get("scale"), self.kernel
        )


def regional_probs(scores: torch.Tensor, heads: int, layout: RegionLayout, beta: float, n_plain: int) -> torch.Tensor:
    """The probabilities of a cross-attention layer under the regional rule, from its float32 scores (B * heads, N,
    T) with the layer's own mask already added: the first ``n_plain`` images softmax over the base text, the others
    ``(1 - beta) softmax_regional + beta softmax_base`` (the explicit form of :func:`regional_attention`)."""
    regional, base = layout.tables.masks(scores.shape[1])
    s = scores.view(scores.shape[0] // heads, heads, *scores.shape[1:])
    p_base = torch.softmax(s.masked_fill(~base, float("-inf")), dim=-1)
    cond = p_base[n_plain:]
    if beta < 1.0:
        p_reg = torch.softmax(s[n_plain:].masked_fill(~regional, float("-inf")), dim=-1)
        cond = p_reg if beta <= 0.0 else (1.0 - beta) * p_reg + beta * cond
    return torch.cat([p_base[:n_plain], cond]).flatten(0, 1)
