"""Randomised oracle sweep: our Attend-and-Excite vs diffusers' StableDiffusionAttendAndExcitePipeline on
model configs, prompts and settings that the test suite does not use, in float64.

    python scripts/oracle_sweep.py [--cases 12] [--seed 1]

Each case draws a tiny UNet config (family, depth, channels, heads, sample size), a scheduler whose
scale_model_input is the identity (diffusers' pipeline never calls it), a prompt from the A&E evaluation
set (attncontrol/data/ae_prompts.json) with its two subjects, and A&E settings (steps, altered steps,
scale factor, thresholds, images per prompt). Prints one line per case and the worst difference.
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from importlib import resources

import torch

import attncontrol
from attncontrol.testing import make_tiny_sd_pipeline


def subjects_of(prompt: str) -> list[str]:
    sep = " and " if " and " in prompt else " with "
    return [half.split()[-1] for half in prompt.split(sep)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from diffusers import StableDiffusionAttendAndExcitePipeline
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    rng = random.Random(args.seed)
    prompts = json.loads(resources.files("attncontrol").joinpath("data/ae_prompts.json").read_text())
    pool = [p for group in prompts.values() for p in group]
    worst = 0.0
    for case in range(args.cases):
        family = rng.choice(["sd1", "sd2"])
        deep = rng.random() < 0.5
        overrides = {
            "layers_per_block": rng.choice([1, 2]),
            "attention_head_dim": rng.choice([(2, 4), (4, 8), (1, 2)]),
        }
        if deep:
            overrides.update(
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=overrides["attention_head_dim"] + (8,),
            )
        sample = rng.choice([16, 24, 32])
        pipe = make_tiny_sd_pipeline(
            family,
            seed=case,
            scheduler=rng.choice(["ddim", "pndm", "dpm"]),
            sample_size=sample,
            unet_overrides=overrides,
        )
        pipe.to(torch.float64)
        for m in pipe.unet.modules():  # float32 upcast would put float32 rounding into a float64 comparison
            if hasattr(m, "upcast_attention"):
                m.upcast_attention = False
        pipe.set_progress_bar_config(disable=True)
        ref_pipe = StableDiffusionAttendAndExcitePipeline(
            **{k: v for k, v in pipe.components.items() if k != "image_encoder"}
        )
        ref_pipe.set_progress_bar_config(disable=True)
        prompt = rng.choice(pool)
        words = subjects_of(prompt)
        table = attncontrol.tokenize(pipe.tokenizer, prompt)
        indices = [attncontrol.resolve_subjects(pipe.tokenizer, prompt, [w])[0][0] for w in words]
        steps = rng.randint(6, 16)
        thresholds = {s: round(rng.uniform(0.05, 0.9), 2) for s in rng.sample(range(steps), rng.randint(0, 3))}
        settings = dict(
            max_iter_to_alter=rng.randint(1, steps), scale_factor=rng.choice([5, 20, 40]), thresholds=thresholds
        )
        res = sample // 2  # the level with cross-attention one downsampling below the latents
        n_img = rng.choice([1, 2])
        common = dict(num_inference_steps=steps, output_type="latent", num_images_per_prompt=n_img)
        ref = ref_pipe(
            prompt,
            token_indices=indices,
            generator=torch.Generator().manual_seed(case),
            attn_res=(res, res),
            **settings,
            **common,
        ).images
        ours = attncontrol.generate(
            pipe,
            prompt,
            [attncontrol.AttendExcite(subjects=words, attn_res=res, exclude_eot=False, **settings)],
            generator=torch.Generator().manual_seed(case),
            **common,
        )
        plain = pipe(prompt, generator=torch.Generator().manual_seed(case), **common).images
        diff = (ours.images - ref).abs().max().item()
        effect = (plain - ref).abs().max().item()
        worst = max(worst, diff)
        print(
            f"case {case:2d}: {family} {'3-level' if deep else '2-level'} {overrides['layers_per_block']} layer(s) "
            f"heads {overrides['attention_head_dim']} {2 * sample}px {type(pipe.scheduler).__name__} "
            f"'{prompt}' -> {words} ({len(table.ids)} tokens) x{n_img} {settings}: diff {diff:.1e}, "
            f"method effect {effect:.1e}",
            flush=True,
        )
    print(f"worst difference over {args.cases} cases: {worst:.1e}")
    if worst > 1e-9:
        raise SystemExit("oracle sweep FAILED: difference above 1e-9")


if __name__ == "__main__":
    main()
