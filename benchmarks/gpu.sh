#!/usr/bin/env bash
# One script for a GPU machine (sized for under 9 minutes on one H100): fp16 correctness (and gradient
# checkpointing giving the same images), then the benchmark tables at 512 px fp16 (the guidance-pass tables
# include the gradient-checkpointing row). Run from the repository root after `pip install -e .` (plus
# open-clip-torch --no-deps).
#   bash benchmarks/gpu.sh 2>&1 | tee gpu.log
set -euo pipefail
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
# fp16 correctness: the tiny model's A&E output in fp16 on CUDA matches fp32, no NaN/inf.
import torch, attncontrol
from attncontrol.testing import make_tiny_sd_pipeline
pipe = make_tiny_sd_pipeline().to("cuda")
pipe.set_progress_bar_config(disable=True)
ctl = [attncontrol.AttendExcite(subjects=["cat", "dog"], attn_res=16)]
run = lambda: attncontrol.generate(pipe, "a cat and a dog", ctl, num_inference_steps=20, output_type="np",
                                   generator=torch.Generator("cuda").manual_seed(0)).images
ref = run()
pipe.to(torch.float16)
half = run()
assert (half == half).all() and abs(half).max() < 1e3, "NaN/inf in fp16"
diff = abs(half.astype("float32") - ref).max()
print(f"fp16 vs fp32 (tiny model, 20 steps, A&E): max abs pixel difference {diff:.4f} (tolerance 0.05)")
assert diff < 0.05
# gradient checkpointing of the guidance forward: same images in fp16 on CUDA
from attncontrol.guidance import GuidanceEngine
class Checkpointed(GuidanceEngine):  # forces the option, whatever generate() passes
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "checkpointing": True})
attncontrol.pipeline.GuidanceEngine = Checkpointed
ckpt = run()
attncontrol.pipeline.GuidanceEngine = GuidanceEngine
cdiff = abs(ckpt.astype("float32") - half.astype("float32")).max()
print(f"fp16, gradient checkpointing vs without (tiny model, 20 steps, A&E): max abs pixel difference {cdiff:.1e}")
assert cdiff < 1e-3
PY
python benchmarks/guidance_pass.py --device cuda --dtype fp16 --repeats 5
python benchmarks/whole_image.py --device cuda --dtype fp16 --steps 50
python benchmarks/batched.py --device cuda --dtype fp16 --size 512 --steps 50 --images 4
python benchmarks/guidance_pass.py --arch sdxl --size 1024 --device cuda --dtype fp16 --repeats 3
# Regional prompting (#27): every attention and FLUX-block row at 512 and 1024 px, R = 2 and 4, bf16 (about a
# minute: milliseconds per call, plus building one random FLUX double and single block).
python benchmarks/regions_pass.py --device cuda --dtype bf16 --full --repeats 10
# Modular Diffusers (#28): the modular pipeline with attncontrol's blocks against generate, tiny models (seconds).
python benchmarks/modular_overhead.py --device cuda --repeats 5
