"""Several images per prompt: our batched guidance (one forward/backward for all images, each with its own
refinement decision) vs diffusers' A&E pipeline, which guides the images one at a time.

    python benchmarks/batched.py [--images 4] [--size 256] [--steps 10] [--device cpu] [--dtype fp32]

Full-size SD 1.5 UNet architecture (random weights), tiny text encoder and VAE, output_type="latent",
A&E with half the steps altered and no refinement; both runs in one process, same seed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, machine  # noqa: E402
from whole_image import DTYPES, build_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()

    from diffusers import StableDiffusionAttendAndExcitePipeline

    import attncontrol

    pipe = build_pipeline(args.device, DTYPES[args.dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
        ref = StableDiffusionAttendAndExcitePipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    n, k = args.steps, args.images
    res = args.size // 32
    common = dict(
        num_inference_steps=n, output_type="latent", height=args.size, width=args.size, num_images_per_prompt=k
    )
    gen_dev = args.device if args.device.startswith("cuda") else "cpu"

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    control = attncontrol.AttendExcite(subjects=["cat", "dog"], max_iter_to_alter=n // 2, thresholds={}, attn_res=res)
    attncontrol.generate(pipe, "a cat and a dog", [control], **{**common, "num_inference_steps": 2})  # warm-up
    with Timer() as t_ours:
        ours = attncontrol.generate(
            pipe, "a cat and a dog", [control], generator=torch.Generator(gen_dev).manual_seed(0), **common
        )
        sync()
    with Timer() as t_ref:
        generator = torch.Generator(gen_dev).manual_seed(0)
        theirs = ref(
            "a cat and a dog",
            token_indices=[2, 5],
            max_iter_to_alter=n // 2,
            thresholds={},
            attn_res=(res, res),
            generator=generator,
            **common,
        ).images
        sync()
    diff = (ours.images.float() - theirs.float()).abs().max().item()
    print(
        f"A&E, {k} images per prompt, full-size SD 1.5 UNet, {args.size} px, {n} steps ({n // 2} altered), "
        f"{args.dtype}, {args.device} ({machine()})"
    )
    print("| run | seconds | images/s |")
    print("|---|---|---|")
    for name, t in (("attncontrol (batched guidance)", t_ours.seconds), ("diffusers (per-image loop)", t_ref.seconds)):
        print(f"| {name} | {t:.1f} | {k / t:.3f} |")
    print(f"throughput ratio {t_ref.seconds / t_ours.seconds:.2f}x; outputs differ by {diff:.1e} (max abs, latents)")


if __name__ == "__main__":
    main()
