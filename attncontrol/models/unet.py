"""Facts of diffusers' ``UNet2DConditionModel`` (SD 1.x, 2.x, SDXL): its attention layers by module name and
resolution level, and its blocks in execution order (for gradient checkpointing)."""

from __future__ import annotations

import re

import torch

from ..processors import CLASSIC
from ..store import AttnLayer

_NAME = re.compile(
    r"^(?P<place>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?\.attentions\.(?P<attn>\d+)"
    r"\.transformer_blocks\.(?P<tb>\d+)\.(?P<which>attn1|attn2)\.processor$"
)
_PLACE = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def unet_layers(unet) -> list[AttnLayer]:
    """Every self-/cross-attention layer of a ``UNet2DConditionModel``, by module name, in execution order.

    ``level`` is the number of 2x downsamplings before the layer: down block k is at level k, the mid
    block at the lowest level, up block k at level ``len(down_blocks) - 1 - k``. attn1 is self-attention,
    attn2 cross-attention.
    """
    n_levels = len(unet.config.down_block_types)
    found = []
    for name in unet.attn_processors:
        m = _NAME.match(name)
        if m is None:
            continue  # not a transformer block attention (e.g. a plain attention block): never captured
        place, rank = m["place"], _PLACE[m["place"]]
        block = int(m["block"]) if m["block"] is not None else 0
        level = {"down_blocks": block, "mid_block": n_levels - 1, "up_blocks": n_levels - 1 - block}[place]
        key = (rank, block, int(m["attn"]), int(m["tb"]), 0 if m["which"] == "attn1" else 1)
        label = place if m["block"] is None else f"{place}.{block}"
        found.append((key, name, "self" if m["which"] == "attn1" else "cross", label, level))
    found.sort()
    return [
        AttnLayer(name, kind, label, level, order, CLASSIC) for order, (_, name, kind, label, level) in enumerate(found)
    ]


def unet_blocks(unet) -> list[tuple[str, torch.nn.Module]]:
    """(name prefix, block) of the down blocks, the mid block and the up blocks, in execution order."""
    blocks: list[tuple[str, torch.nn.Module]] = [(f"down_blocks.{k}.", b) for k, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        blocks.append(("mid_block.", unet.mid_block))
    blocks += [(f"up_blocks.{k}.", b) for k, b in enumerate(unet.up_blocks)]
    return blocks


def blocks_before(unet, layer_name: str) -> list[torch.nn.Module]:
    """The top-level blocks that run entirely before the block holding ``layer_name`` (an ``attn_processors`` key)."""
    blocks = unet_blocks(unet)
    for k, (prefix, _) in enumerate(blocks):
        if layer_name.startswith(prefix):
            return [b for _, b in blocks[:k]]
    raise ValueError(f"{layer_name!r} is in none of the UNet's down/mid/up blocks")


def checkpoint_layers(unet, layer_name: str) -> list[torch.nn.Module]:
    """The layers (resnets, transformer models, down/upsamplers) of :func:`blocks_before`: what a checkpointed
    guidance pass recomputes."""
    layers = []
    for block in blocks_before(unet, layer_name):
        for group in ("resnets", "attentions", "downsamplers", "upsamplers"):
            layers += list(getattr(block, group, None) or ())
    return layers
