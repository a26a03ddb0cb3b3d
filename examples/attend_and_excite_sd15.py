"""Attend-and-Excite on Stable Diffusion 1.5 as a plugin to the stock diffusers pipeline.

    python examples/attend_and_excite_sd15.py

Downloads the model from the Hugging Face Hub on first use (safetensors only). Saves the baseline and the
controlled image side by side with the same seed.
"""

import torch
from diffusers import StableDiffusionPipeline

import attncontrol

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
pipe = StableDiffusionPipeline.from_pretrained(
    "stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=dtype, use_safetensors=True
).to(device)

prompt = "a cat and a frog"
print(attncontrol.tokenize(pipe.tokenizer, prompt).format())  # the indices you could pass instead of words

for name, controls in (("baseline", []), ("attend-excite", [attncontrol.AttendExcite(subjects=["cat", "frog"])])):
    out = attncontrol.generate(pipe, prompt, controls, generator=torch.Generator(device).manual_seed(6141))
    out.images[0].save(f"cat_frog_{name}.png")
    if out.guided_steps:
        first, last = out.guided_steps[0], out.guided_steps[-1]
        print(f"{name}: loss {first.loss[0]:.3f} at step 0 -> {last.loss[0]:.3f} at step {last.index}")
