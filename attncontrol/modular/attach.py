"""Put attncontrol's blocks into a family's text-to-image blocks (:func:`attach`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from diffusers.modular_pipelines.modular_pipeline import (
    MODULAR_PIPELINE_MAPPING,
    ConditionalPipelineBlocks,
    LoopSequentialPipelineBlocks,
    ModularPipelineBlocks,
    SequentialPipelineBlocks,
)
from diffusers.modular_pipelines.modular_pipeline_utils import InsertableDict

from ..errors import OptionError, UnsupportedPipelineError
from .blocks import (
    AttnControl,
    AttnControlEndStep,
    AttnControlGuide,
    AttnControlNoise,
    AttnControlScope,
    adapter_class_of,
)

GUIDE, END, NOISE, SCOPE = "attncontrol_guide", "attncontrol_end", "attncontrol_noise", "attncontrol"


def _flat(blocks: ModularPipelineBlocks, prefix: str = "") -> list[tuple[str, ModularPipelineBlocks]]:
    """The leaf steps (a denoise loop counts as one) of nested sequential blocks, in order, by dotted name."""
    out = []
    for name, block in blocks.sub_blocks.items():
        full = f"{prefix}{name}"
        if isinstance(block, ConditionalPipelineBlocks):
            raise UnsupportedPipelineError(
                f"step {full!r} ({type(block).__name__}) picks its sub-steps from the inputs; attach to one "
                "workflow's blocks (attach(blocks, ..., workflow='text2image'))"
            )
        if isinstance(block, SequentialPipelineBlocks) and not isinstance(block, AttnControlScope):
            out.extend(_flat(block, f"{full}."))
        else:
            out.append((full, block))
    return out


def _one(steps: list[tuple[str, ModularPipelineBlocks]], what: str, test) -> int:
    found = [k for k, (name, block) in enumerate(steps) if test(name, block)]
    if len(found) != 1:
        names = ", ".join(name for name, _ in steps)
        raise UnsupportedPipelineError(f"expected one {what} among the steps ({names}); found {len(found)}")
    return found[0]


def _check_family(blocks: ModularPipelineBlocks) -> None:
    model = blocks.model_name
    map_fn = MODULAR_PIPELINE_MAPPING.get(model) if model else None
    name = map_fn() if map_fn is not None else f"model {model!r}"
    adapter_class_of(name)  # raises naming the supported modular pipelines


def attach(blocks: ModularPipelineBlocks, controls=(), *, workflow: str = "text2image", **options):
    """``blocks`` (a family's Modular Diffusers blocks, e.g. ``StableDiffusionXLAutoBlocks()``) as one text-to-image
    sequence with attncontrol's blocks in place; ``blocks`` itself is left as it was.

    ``controls``: an :class:`AttnControl` block, or controls (``[AttendExcite(subjects=["cat", "dog"])]``) with
    ``options`` (``attention=``, ``checkpointing=``) to build one. The result: the encoder step is
    ``AttnControl`` (``sub_blocks["text_encoder"]``), and a step ``"attncontrol"`` (an :class:`AttnControlScope`)
    holds the noise block, the family's prepare-latents step and what follows it up to and including the denoise
    loop, whose sub-blocks start with ``"attncontrol_guide"`` and end with ``"attncontrol_end"``."""
    block = controls if isinstance(controls, AttnControl) else AttnControl(_controls(controls), **options)
    if isinstance(controls, AttnControl) and options:
        raise OptionError(f"pass {', '.join(sorted(options))} to AttnControl(...), not to attach, with a block")
    if workflow != "text2image":
        raise OptionError(
            f"workflow {workflow!r}: attncontrol's blocks serve text-to-image only (its noise block replaces the "
            "initial latents an image-to-image or inpainting workflow would make from the image)"
        )
    if workflow in _workflows(blocks):
        blocks = blocks.get_workflow(workflow)
    _check_family(blocks)
    steps = [(name, copy.deepcopy(b)) for name, b in _flat(blocks)]
    encoder = _one(steps, "text-encoder step", lambda n, b: n.split(".")[-1] == "text_encoder")
    loop = _one(steps, "denoise loop", lambda n, b: isinstance(b, LoopSequentialPipelineBlocks))
    prepare = _one(steps, "prepare-latents step", lambda n, b: n.split(".")[-1] == "prepare_latents")
    if not encoder < prepare < loop:
        raise UnsupportedPipelineError("the text encoder, prepare-latents and denoise loop steps are out of order")
    loop_block = steps[loop][1]
    loop_block.sub_blocks.insert(GUIDE, AttnControlGuide(), 0)
    loop_block.sub_blocks[END] = AttnControlEndStep()
    block = copy.copy(block)  # the caller's block stays unattached; it holds no per-call state
    block.encoder = steps[encoder][1]
    inner = InsertableDict([(NOISE, AttnControlNoise()), *steps[prepare : loop + 1]])
    scope = AttnControlScope.from_blocks_dict(inner)
    top = InsertableDict(steps[:encoder])
    top[steps[encoder][0]] = block
    top.update(steps[encoder + 1 : prepare])
    top[SCOPE] = scope
    top.update(steps[loop + 1 :])
    return SequentialPipelineBlocks.from_blocks_dict(top)


def _workflows(blocks) -> list[str]:
    try:
        return list(blocks.available_workflows or [])
    except (NotImplementedError, AttributeError):
        return []


def _controls(controls) -> list:
    if isinstance(controls, Sequence) and not isinstance(controls, str):
        return list(controls)
    return [controls]
