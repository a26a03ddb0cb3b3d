#!/usr/bin/env bash
# Install everything the tests need into ./.venv (created if missing) and run them offline.
# Usage: bash scripts/test.sh [--quick] [pytest args...]
#   --quick  the developer loop: leaves out the tests marked slow (oracles in float64, child processes, the
#            browser); CI runs everything. Extra arguments go to pytest (e.g. -k oracle, -n 0 for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first: this exact version is a CPU wheel on the project's machines (a CUDA build elsewhere).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,ui,eval]"
# The CLIP BPE vocabulary for the offline tokenizer; --no-deps keeps torch as installed above.
python -m pip install -q --no-deps "open-clip-torch>=2.20"
# The UI's browser test drives Debian's Chromium (never `playwright install`).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
ruff check attncontrol tests benchmarks examples scripts
ruff format --check attncontrol tests benchmarks examples scripts
mypy  # the package, as configured in pyproject.toml (torch and numpy types seen)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# One pytest worker per core, each torch process on one thread: on 2 cores two single-threaded workers finish the
# suite sooner than one process on 2 threads (tiny models leave little to split inside an op), and more threads
# than cores make OpenMP spin (a tiny generate ran 10x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then ARGS+=(-m "not slow"); else ARGS+=("$arg"); fi
done
python -m pytest -n auto --dist worksteal "${ARGS[@]}"
