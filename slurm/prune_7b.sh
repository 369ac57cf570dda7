#!/bin/bash
# slurm/prune_7b.sh — EfficientXpert LoRA fine-tuning + pruning of Llama-2 7B (health domain)
# with DeepSpeed ZeRO-3, one process per GPU over one or more nodes.
#
#   mkdir -p logs && sbatch slurm/prune_7b.sh [key=value overrides...]
#   DRY_RUN=1 SLURM_JOB_NODELIST='gpu[001-002]' SLURM_JOB_ID=1234 bash slurm/prune_7b.sh   # show commands
#
# ---- edit for your cluster (sbatch reads these lines before the script runs: literal values only)
#SBATCH --job-name=xpert-7b
#SBATCH --partition=gpu              # partition with GPU nodes
#SBATCH --nodes=2                    # nodes; 7B fits one node, 2 nodes halve the wall time
#SBATCH --ntasks-per-node=4          # = GPUs per node (one process per GPU)
#SBATCH --gpus-per-node=4            # GPUs per node
#SBATCH --cpus-per-task=8            # CPU cores per GPU process
#SBATCH --mem=256G                   # host memory per node
#SBATCH --time=12:00:00              # wall-clock limit; the job requeues itself and resumes
#SBATCH --requeue                    # allow requeue after preemption / the time-limit warning
#SBATCH --signal=USR1@300            # USR1 to every rank 300 s before the limit: checkpoint + requeue
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --output=logs/%x-%j.out      # logs/ must exist before sbatch (mkdir -p logs)
#SBATCH --error=logs/%x-%j.err

CONFIG=configs/llama7b_health.yaml           # run config (model path, data, pruning, output_dir)
DS_CONFIG=ds_configs/zero3.json              # DeepSpeed ZeRO-3 (7B needs no offload on 40-80 GB GPUs)
PYTHON=${PYTHON:-python}                     # interpreter of the venv with xpert-dist (or activate it below)
OVERRIDES=()                                 # fixed extra overrides, e.g. (prune.sparsity=0.5 train.seed=1)
MAX_REQUEUES=20                              # self-requeues allowed (preemption + time-limit warnings)
XD_EXPORTS=(NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1)  # e.g. NCCL_SOCKET_IFNAME=ib0
# source /path/to/venv/bin/activate          # or: module load cuda/12.4 ...
# ---- end of settings

# The batch script runs from a copy in SLURM's spool folder: find the repository.
if [ -z "${REPO_DIR:-}" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${DRY_RUN:-0}" != 1 ]; then
  _cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2-)
  [ -f "${_cmd:-}" ] && REPO_DIR=$(cd "$(dirname "$_cmd")/.." && pwd)
fi
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
XD_SCRIPT=${BASH_SOURCE[0]}
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
xd_launch "$@"
