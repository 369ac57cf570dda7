#!/usr/bin/env bash
# The one prepared GPU check (bench/gpu_check.py): ~7B Llama-shaped random model on one CUDA GPU,
# LoRA steps with and without an in-loop prune step, and a full-Hessian (stats + ForeSight + PBS full)
# prune of one block; prints JSON (step times, prune times, peak GPU memory, planner prediction).
#   bash bench/gpu_check.sh            # on the GPU machine, from anywhere; < 8 minutes
#   bash bench/gpu_check.sh --tiny     # CPU smoke test of the same code path (seconds)
# Needs torch (CUDA build), transformers, peft, pyyaml, tqdm. The device machine has no network: if
# they are missing, put wheels in bench/wheels/ beforehand, e.g.
#   pip download --only-binary=:all: --python-version 3.11 -d bench/wheels transformers==5.24.0 peft==0.21.2
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
if ! "$PY" -c "import torch, transformers, peft, yaml, tqdm" 2>/dev/null; then
  if [ -d bench/wheels ]; then
    "$PY" -m pip install -q --no-index --find-links bench/wheels transformers peft pyyaml tqdm
  else
    echo '{"error": "missing python packages (torch, transformers, peft, pyyaml, tqdm) and no bench/wheels/"}'
    exit 3
  fi
fi
case " $* " in
  *" --tiny "*) export DS_ACCELERATOR=cpu ;;
  *) "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
       || { echo '{"error": "no CUDA device visible to torch; run with --tiny for the CPU smoke test"}'; exit 2; } ;;
esac
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())" >&2
exec timeout 470 "$PY" bench/gpu_check.py "$@"
