"""What the Modular Diffusers path (issue #28) costs over ``attncontrol.generate``: the same controls, the same
tiny model, the same steps, timed alternately in one process.

    python benchmarks/modular_overhead.py                 # CPU, tiny models of SDXL, FLUX.1 and Qwen-Image
    python benchmarks/modular_overhead.py --device cuda   # the same on a GPU

Both paths run the same forwards and guidance passes; what differs is the Modular machinery (the pipeline state,
the blocks' input/output bookkeeping) and attncontrol's stock-pipeline view built once per call. On tiny models
the forwards are milliseconds, so this is an upper bound of that fixed cost, not a real model's ratio: on a real
model the same fixed cost sits beside seconds of denoising.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from _common import Timer, machine

FAMILIES = {"sdxl": ("StableDiffusionXLAutoBlocks", 5.0), "flux": ("FluxAutoBlocks", None)}
FAMILIES["qwenimage"] = ("QwenImageAutoBlocks", 4.0)


def _setup(family: str, device: str):
    import diffusers.modular_pipelines as modular
    from diffusers.guiders import ClassifierFreeGuidance

    import attncontrol
    from attncontrol.modular import attach
    from attncontrol.testing import make_tiny_pipeline

    blocks_name, scale = FAMILIES[family]
    pipe = make_tiny_pipeline(family).to(device)
    pipe.set_progress_bar_config(disable=True)
    controls = [attncontrol.AttendExcite(subjects=["cat", "dog"])]
    mp = attach(getattr(modular, blocks_name)(), controls).init_pipeline()
    mp.update_components(**{k: v for k, v in pipe.components.items() if v is not None})
    stock_kwargs = {}
    if scale is not None:
        mp.update_components(guider=ClassifierFreeGuidance(guidance_scale=scale))
        stock_kwargs = {"true_cfg_scale": scale} if family == "qwenimage" else {"guidance_scale": scale}
    mp.set_progress_bar_config(disable=True)
    negative = {"negative_prompt": "blurry"} if family == "qwenimage" else {}
    common = dict(num_inference_steps=10, height=64, width=64, output_type="pt", **negative)

    def via_generate():
        g = torch.Generator(device).manual_seed(0)
        return attncontrol.generate(pipe, "a cat and a dog", controls, generator=g, **common, **stock_kwargs)

    def via_modular():
        g = torch.Generator(device).manual_seed(0)
        return mp(prompt="a cat and a dog", generator=g, **common)

    return via_generate, via_modular


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"# modular vs generate: tiny models, A&E, 10 steps, 64 px; {machine()}, device {args.device}\n")
    print("| family | generate (s, median) | modular (s, median) | modular / generate |")
    print("|---|---|---|---|")
    for family in FAMILIES:
        via_generate, via_modular = _setup(family, args.device)
        via_generate(), via_modular()  # warm-up
        times: dict[str, list[float]] = {"generate": [], "modular": []}
        for _ in range(args.repeats):  # alternately: both see the same machine load
            for name, fn in (("generate", via_generate), ("modular", via_modular)):
                with Timer() as t:
                    fn()
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                times[name].append(t.seconds)
        g, m = statistics.median(times["generate"]), statistics.median(times["modular"])
        print(f"| {family} | {g:.3f} | {m:.3f} | {m / g:.2f} |")


if __name__ == "__main__":
    main()
