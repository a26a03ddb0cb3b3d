"""Attend-and-Excite in a Modular Diffusers pipeline, for every family that has modular blocks.

    python examples/modular.py --family sdxl --prompt "a cat and a frog" --subjects cat frog
    python examples/modular.py --family qwenimage --out qwen.png
    python examples/modular.py --family flux --tiny          # a tiny random model, offline, on the CPU

Each family's entry says which blocks, which repository, which dtype, how its guidance is set (a guider component,
or an input of the call for the distilled-guidance models) and the steps its model card uses.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Family:
    blocks: str  # a class of diffusers.modular_pipelines
    repo: str
    dtype: torch.dtype
    steps: int
    guider_scale: float | None = None  # ClassifierFreeGuidance(guidance_scale=...): 1 is no guidance
    call: dict = field(default_factory=dict)  # more inputs of the call (distilled guidance, negative prompt)


FAMILIES = {
    "sdxl": Family("StableDiffusionXLAutoBlocks", "stabilityai/stable-diffusion-xl-base-1.0", torch.float16, 50, 5.0),
    "sd3": Family("StableDiffusion3AutoBlocks", "stabilityai/stable-diffusion-3.5-medium", torch.bfloat16, 40, 4.5),
    "flux": Family("FluxAutoBlocks", "black-forest-labs/FLUX.1-dev", torch.bfloat16, 28, call={"guidance_scale": 3.5}),
    "flux2": Family(
        "Flux2AutoBlocks", "black-forest-labs/FLUX.2-dev", torch.bfloat16, 28, call={"guidance_scale": 4.0}
    ),
    "klein": Family("Flux2KleinAutoBlocks", "black-forest-labs/FLUX.2-klein-4B", torch.bfloat16, 4),
    "klein-base": Family("Flux2KleinBaseAutoBlocks", "black-forest-labs/FLUX.2-klein-base-4B", torch.bfloat16, 50, 4.0),
    "qwenimage": Family("QwenImageAutoBlocks", "Qwen/Qwen-Image", torch.bfloat16, 50, 4.0, {"negative_prompt": " "}),
    # ZImagePipeline's guidance_scale=4.0 is this guider's 5.0 (its formula counts from the positive branch)
    "zimage": Family("ZImageAutoBlocks", "Tongyi-MAI/Z-Image", torch.bfloat16, 50, 5.0),
}
TINY = {"klein-base": "klein"}  # attncontrol.testing's tiny model of each family


def build(name: str, subjects: list[str], tiny: bool = False, device: str | None = None):
    """The family's text-to-image modular pipeline with Attend-and-Excite on ``subjects``, its components loaded."""
    import diffusers.modular_pipelines as modular
    from diffusers.guiders import ClassifierFreeGuidance

    import attncontrol
    from attncontrol.modular import attach

    family = FAMILIES[name]
    blocks = attach(getattr(modular, family.blocks)(), [attncontrol.AttendExcite(subjects=subjects)])
    if tiny:
        from attncontrol.testing import make_tiny_pipeline

        pipe = blocks.init_pipeline()
        parts = make_tiny_pipeline(TINY.get(name, name)).components
        pipe.update_components(**{k: v for k, v in parts.items() if v is not None})
    else:
        pipe = blocks.init_pipeline(family.repo)
        pipe.load_components(dtype=family.dtype)
    if family.guider_scale is not None:
        pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=family.guider_scale))
    if device is not None:
        pipe.to(device)
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sdxl")
    parser.add_argument("--prompt", default="a cat and a frog")
    parser.add_argument("--subjects", nargs="+", default=["cat", "frog"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the family's (see FAMILIES)")
    parser.add_argument("--out", default="modular.png")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (offline, CPU): checks the wiring")
    args = parser.parse_args(argv)

    family = FAMILIES[args.family]
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    pipe = build(args.family, args.subjects, tiny=args.tiny, device=device)
    size = {"height": 64, "width": 64} if args.tiny else {}
    state = pipe(
        prompt=args.prompt,
        num_inference_steps=args.steps or (2 if args.tiny else family.steps),
        generator=torch.Generator(device).manual_seed(args.seed),
        **family.call,
        **size,
    )
    state.get("images")[0].save(args.out)
    losses = [round(r.loss[0], 3) for r in state.get("attncontrol_trace") if r.loss is not None]
    print(f"{args.out}: Attend-and-Excite loss per guided step {losses}")


if __name__ == "__main__":
    main()
