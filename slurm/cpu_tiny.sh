#!/bin/bash
# slurm/cpu_tiny.sh — the sbatch script shape of prune_70b.sh for the local CPU cluster
# (.ci/slurm-up.sh): 2 ranks on one node, gloo, a tiny config. Used by tests/launch.
#
#   sbatch slurm/cpu_tiny.sh path/to/tiny.json [key=value overrides...]
#   sbatch -p multi --nodes=2 --ntasks-per-node=1 slurm/cpu_tiny.sh tiny.json   # two nodes (xn1, xn2)
#   DS_CONFIG=ds_configs/zero3.json sbatch ...                                  # ZeRO-3 (plain torch by default)
#   DRY_RUN=1 bash slurm/cpu_tiny.sh path/to/tiny.json
#
# ---- edit for your cluster (literal values only)
#SBATCH --job-name=xpert-cpu-tiny
#SBATCH --partition=debug            # the partition of .ci/slurm-up.sh
#SBATCH --nodes=1                    # nodes
#SBATCH --ntasks-per-node=2          # ranks per node (CPU processes, gloo)
#SBATCH --cpus-per-task=1            # one core per rank
#SBATCH --mem=4G                     # memory per node
#SBATCH --time=00:15:00              # wall-clock limit
#SBATCH --requeue                    # allow requeue after preemption / the time-limit warning
#SBATCH --signal=USR1@60             # USR1 to every rank 60 s before the limit: checkpoint + requeue
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --output=xpert-cpu-tiny-%j.out

CONFIG=${1:?usage: sbatch slurm/cpu_tiny.sh CONFIG [key=value ...]}   # the tiny run config (first argument)
shift
DS_CONFIG=${DS_CONFIG:-}                     # empty: plain torch (gloo process group); or a ZeRO-3 JSON
PYTHON=${PYTHON:-python}                     # interpreter of the venv with xpert-dist
OVERRIDES=()                                 # fixed extra overrides
MAX_REQUEUES=3                               # self-requeues allowed
XD_EXPORTS=(DS_ACCELERATOR=cpu)              # CPU: DeepSpeed's CPU accelerator, gloo backend
# ---- end of settings

if [ -z "${REPO_DIR:-}" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${DRY_RUN:-0}" != 1 ]; then
  _cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2-)
  [ -f "${_cmd:-}" ] && REPO_DIR=$(cd "$(dirname "$_cmd")/.." && pwd)
fi
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
XD_SCRIPT=${BASH_SOURCE[0]}
# the config path may be relative to where sbatch was called
case "$CONFIG" in /*) ;; *) [ -f "${SLURM_SUBMIT_DIR:-.}/$CONFIG" ] && CONFIG=$(cd "${SLURM_SUBMIT_DIR:-.}" && pwd)/$CONFIG ;; esac
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
xd_launch "$@"
