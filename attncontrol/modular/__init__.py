"""attncontrol as Modular Diffusers blocks: the same run as :func:`attncontrol.generate`, inside a modular pipeline.

Example (SDXL; FLUX.1 and Qwen-Image the same with their blocks)::

    import torch
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from attncontrol import AttendExcite
    from attncontrol.modular import attach

    blocks = attach(StableDiffusionXLAutoBlocks(), [AttendExcite(subjects=["cat", "dog"])])
    pipe = blocks.init_pipeline("stabilityai/stable-diffusion-xl-base-1.0")
    pipe.load_components(torch_dtype=torch.float16)
    pipe.to("cuda")
    state = pipe(prompt="a cat and a dog", generator=torch.Generator("cuda").manual_seed(0))
    state.get("images")[0].save("cat_dog.png")
    print(state.get("attncontrol_trace")[0].loss)

Importing this module imports diffusers' modular pipelines; ``import attncontrol`` does not.
"""

from .attach import attach
from .blocks import (
    AttnControl,
    AttnControlEndStep,
    AttnControlGuide,
    AttnControlNoise,
    AttnControlScope,
    RunHandle,
    load_block,
    save_block,
    stock_view,
)
from .folder import UntrustedBlockError

__all__ = [
    "AttnControl",
    "AttnControlEndStep",
    "AttnControlGuide",
    "AttnControlNoise",
    "AttnControlScope",
    "RunHandle",
    "UntrustedBlockError",
    "attach",
    "load_block",
    "save_block",
    "stock_view",
]
