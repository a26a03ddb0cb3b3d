"""Attend-and-Excite with a model folder you downloaded yourself, in fp16 on CUDA.

    hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir ./sd15   # once, where the Hub is reachable
    python examples/local_model_fp16.py ./sd15 "a red car and a blue bench" car bench

Any diffusers-layout folder of an SD 1.x / 2.x model works (SD 2.x: EOT/padding are left out of the
softmax over tokens, as the official A&E code does for SD 2.1). Without CUDA it falls back to CPU fp32.
"""

import sys

import torch

import attncontrol
from attncontrol.loading import load_pipeline

folder, prompt, *subjects = sys.argv[1:] or ["./sd15", "a red car and a blue bench", "car", "bench"]
device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_pipeline(folder, device=device, dtype="fp16" if device == "cuda" else "fp32")  # safetensors only

out = attncontrol.generate(
    pipe,
    prompt,
    [attncontrol.AttendExcite(subjects=subjects)],
    num_images_per_prompt=2,  # both images are guided in one batched pass
    generator=torch.Generator(device).manual_seed(0),
)
for k, image in enumerate(out.images):
    image.save(f"local_{k}.png")
print("per-image loss at the last altered step:", out.guided_steps[-1].loss)
