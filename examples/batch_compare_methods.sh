#!/usr/bin/env bash
# Compare the baseline and three methods on the Attend-and-Excite paper's animal pairs, 4 seeds each.
# Rerun the same command after an interruption: finished images are skipped.
#   bash examples/batch_compare_methods.sh [MODEL]   (default: the SD 1.5 hub id; or a local folder)
set -euo pipefail
MODEL=${1:-stable-diffusion-v1-5/stable-diffusion-v1-5}
attncontrol batch --prompt-set ae-animals --seeds 0-3 \
  --methods none,attend-excite,astar,attend-excite+astar \
  --model "$MODEL" --out runs/ae-animals --batch-size 2
# one line per image: prompt, method, seed, file, per-control loss summary, seconds
head -n 2 runs/ae-animals/manifest.jsonl
