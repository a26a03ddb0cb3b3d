#!/usr/bin/env bash
# The paper's protocol size (276 prompts x 64 seeds x 2 methods = 35,328 images) across all GPUs of a node.
# Each process takes the items whose key falls to it, writes its own manifest part; parts are merged at the
# end (and by any rerun, e.g. after a crash). Rerunning the same command resumes.
#   bash examples/batch_multi_gpu.sh [NUM_GPUS] [MODEL]
set -euo pipefail
NGPU=${1:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
MODEL=${2:-stable-diffusion-v1-5/stable-diffusion-v1-5}
accelerate launch --multi_gpu --num_processes "$NGPU" -m attncontrol batch \
  --prompt-set ae-all --seeds 0-63 --methods none,attend-excite \
  --model "$MODEL" --dtype fp16 --batch-size 4 --out runs/ae-all
