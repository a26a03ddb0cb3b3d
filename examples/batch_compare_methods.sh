#!/usr/bin/env bash
# Compare the baseline and three methods on the Attend-and-Excite paper's animal pairs, 4 seeds each, then
# score them. Rerun the same command after an interruption: finished images are skipped.
#   bash examples/batch_compare_methods.sh [MODEL] [CLIP_DIR]
#   MODEL: the SD 1.5 hub id by default, or a local folder; CLIP_DIR: optional local CLIP folder, e.g.
#   huggingface-cli download openai/clip-vit-base-patch16 --local-dir clip-b16
set -euo pipefail
MODEL=${1:-stable-diffusion-v1-5/stable-diffusion-v1-5}
CLIP=${2:-}
attncontrol batch --prompt-set ae-animals --seeds 0-3 \
  --methods none,attend-excite,astar,attend-excite+astar \
  --model "$MODEL" --out runs/ae-animals --batch-size 2
# one line per image: prompt, method, seed, file, per-control loss summary, attention metrics, seconds
head -n 2 runs/ae-animals/manifest.jsonl
# the comparison table (attention metrics always; CLIP scores with a CLIP folder) and one grid per prompt
attncontrol eval runs/ae-animals --grid ${CLIP:+--clip "$CLIP"}
