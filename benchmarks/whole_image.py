"""A whole Attend-and-Excite image on the full-size SD 1.5 UNet architecture (random weights), 512 px:
plain SD vs attncontrol vs diffusers' StableDiffusionAttendAndExcitePipeline, same seed, one process.

    python benchmarks/whole_image.py [--steps 10] [--refinement] [--device cpu] [--dtype fp32]

Half of the steps are altered (max_iter_to_alter = steps // 2), as A&E's defaults do at 50 steps. Without
--refinement, thresholds are empty; with it, they are the defaults' {0, 10, 20} scaled to the step count.
The text encoder and VAE are tiny (the cost is the UNet's); output_type="latent" skips decoding.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, full_size_unet, machine  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_pipeline(device, dtype):
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from attncontrol.testing import make_clip_tokenizer, make_scheduler

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=12,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=make_clip_tokenizer(),
            unet=full_size_unet(),
            scheduler=make_scheduler("ddim"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--refinement", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--sensitivity",
        action="store_true",
        help="also rerun ours from initial noise moved by 1e-7: how far fp32 rounding alone moves the output",
    )
    args = parser.parse_args()

    from diffusers import StableDiffusionAttendAndExcitePipeline

    import attncontrol

    pipe = build_pipeline(args.device, DTYPES[args.dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_pipe = StableDiffusionAttendAndExcitePipeline(
            **{k: v for k, v in pipe.components.items() if k != "image_encoder"}
        )
    ref_pipe.set_progress_bar_config(disable=True)
    n = args.steps
    thresholds = {0: 0.05, n // 5: 0.5, 2 * n // 5: 0.8} if args.refinement else {}
    prompt, common = (
        "a cat and a dog",
        dict(num_inference_steps=n, output_type="latent", height=args.size, width=args.size),
    )
    gen_dev = args.device if args.device.startswith("cuda") else "cpu"

    def seed():
        return torch.Generator(gen_dev).manual_seed(0)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    results = {}
    pipe(prompt, generator=seed(), **{**common, "num_inference_steps": 2})  # warm-up
    with Timer() as t:
        results["plain"] = pipe(prompt, generator=seed(), **common).images
        sync()
    results["plain_s"] = t.seconds
    # The same maps for both: ours default to the level 4x below the latents; diffusers' __call__ defaults to a
    # fixed (16, 16) whatever the size (its docstring says "computed from width and height"), so pass it.
    res = (args.size // 32, args.size // 32)
    control = attncontrol.AttendExcite(subjects=["cat", "dog"], max_iter_to_alter=n // 2, thresholds=thresholds)
    with Timer() as t:
        ours = attncontrol.generate(pipe, prompt, [control], generator=seed(), **common)
        sync()
    results["ours_s"] = t.seconds
    with Timer() as t:
        ref = ref_pipe(
            prompt,
            token_indices=[2, 5],
            generator=seed(),
            max_iter_to_alter=n // 2,
            thresholds=thresholds,
            attn_res=res,
            **common,
        ).images
        sync()
    results["ref_s"] = t.seconds
    diff = (ours.images.float() - ref.float()).abs().max().item()
    if args.sensitivity:
        shape = (1, pipe.unet.config.in_channels, args.size // 8, args.size // 8)
        noise = torch.randn(shape, generator=seed(), device=args.device, dtype=pipe.unet.dtype)
        nudged = noise + 1e-7 * torch.randn(shape, generator=torch.Generator(gen_dev).manual_seed(1)).to(noise)
        runs = [attncontrol.generate(pipe, prompt, [control], latents=z, **common).images for z in (noise, nudged)]
        results["sensitivity"] = (runs[0].float() - runs[1].float()).abs().max().item()
    effect = (results["plain"].float() - ref.float()).abs().max().item()
    refine = sum(sum(r.refinement_iterations or [0]) for r in ours.trace)
    print(
        f"Whole A&E image, full-size SD 1.5 UNet, {args.size} px, {n} steps ({n // 2} altered), "
        f"refinement {'on' if args.refinement else 'off'} ({refine} iterations), {args.dtype}, {args.device} "
        f"({machine()})"
    )
    print("| run | seconds | x plain |")
    print("|---|---|---|")
    for name, key in (("plain SD", "plain_s"), ("attncontrol A&E", "ours_s"), ("diffusers A&E pipeline", "ref_s")):
        print(f"| {name} | {results[key]:.1f} | {results[key] / results['plain_s']:.2f} |")
    print(
        f"attncontrol is {results['ref_s'] / results['ours_s']:.2f}x faster than diffusers' pipeline; "
        f"outputs differ by {diff:.1e} (max abs, latents) against a method effect of {effect:.1e}"
    )
    if args.sensitivity:
        print(
            f"sensitivity: moving the initial noise by 1e-7 moves our own output by {results['sensitivity']:.1e} "
            "(the floor for any fp32 comparison of this run)"
        )


if __name__ == "__main__":
    main()
