#!/usr/bin/env bash
# The recorded structural-shift and transfer results of docs/analysis.md (SmolLM2-135M, CPU).
# Reruns resume from bench/shift/smollm2/cache (git-ignored); delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
nice -n 10 "$PY" launchers/analyze.py shift --model smollm2 --domains general,health,legal \
    --method foresight --sparsity 0.4,0.5 --calib-samples 32 --calib-seq-len 256 \
    --adapt-steps 12 --adapt-domains health,legal --adapt-batch-size 2 --adapt-seq-len 256 --adapt-lr 1e-3 \
    --out bench/shift/smollm2 --no-progress
nice -n 10 "$PY" launchers/analyze.py transfer --shift-dir bench/shift/smollm2 --targets health,legal \
    --sources before:general,after:other,after:self --tasks none --perplexity-windows 8 --perplexity-seq-len 256 \
    --out bench/shift/smollm2_transfer --no-progress
