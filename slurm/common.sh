# slurm/common.sh — shared logic of the sbatch scripts in this folder (sourced, not run).
#
# The calling script sets, before `source`-ing this file and calling `xd_launch "$@"`:
#   REPO_DIR         repository root (run.py is launched from there)
#   XD_SCRIPT        path of the calling script (its #SBATCH lines are read in DRY_RUN mode)
#   PYTHON           interpreter of the environment with xpert-dist installed
#   CONFIG           run config (YAML/JSON), relative to REPO_DIR or absolute
#   DS_CONFIG        DeepSpeed JSON, or empty for plain torch
#   OVERRIDES        bash array of extra key=value overrides (may be empty)
#   MAX_REQUEUES     how many times the job may requeue itself after a warning signal
#   XD_EXPORTS       bash array of extra NAME=VALUE environment settings for every rank
# Arguments given to the script are appended as further overrides.
#
# One process per GPU: `srun` starts nodes x ntasks-per-node copies of launchers/run.py; each
# finds its rank from SLURM_PROCID/SLURM_LOCALID/SLURM_NODEID (xpert_dist/launch/env.py) and
# the rendezvous from MASTER_ADDR (first host of the node list) and MASTER_PORT (derived from
# the job id; env.port_from_job_id computes the same). Tasks see all GPUs of their node and
# select theirs by local rank.
#
# Preemption / time limit: SLURM sends USR1 (--signal=USR1@N) or TERM to every rank; the run
# writes a checkpoint and exits 75 (and the first signalled rank on this node touches a marker
# file). If the step then ended non-zero, this script requeues the job (`scontrol requeue`), up
# to MAX_REQUEUES times; the requeued job resumes from output_dir/checkpoints.
#
# DRY_RUN=1: print, per node, the exact command and environment of every rank, run nothing.
# Outside SLURM give a node list and job id: DRY_RUN=1 SLURM_JOB_NODELIST='gpu[001-004]'
# SLURM_JOB_ID=1234 bash slurm/prune_70b.sh

XD_EXIT_PREEMPTED=75   # xpert_dist.launch.signals.EXIT_PREEMPTED

xd_log() { echo "[xpert $(date +%H:%M:%S)] $*"; }

# value of "#SBATCH --NAME=VALUE" (or "--NAME VALUE") in FILE, last occurrence wins
xd_sbatch_opt() {
  sed -n -E "s/^#SBATCH[[:space:]]+--$1(=|[[:space:]]+)([^[:space:]#]+).*/\\2/p" "$2" | tail -n 1
}

# expand a SLURM node list into one host per line
xd_hostnames() {
  if command -v scontrol >/dev/null 2>&1 && scontrol show hostnames "$1" 2>/dev/null; then
    return 0
  fi
  "$PYTHON" -c 'import sys; from xpert_dist.launch.env import parse_nodelist; print("\n".join(parse_nodelist(sys.argv[1])))' "$1"
}

# rendezvous port from the job id: same formula as xpert_dist.launch.env.port_from_job_id
xd_port() {
  local digits=${1//[^0-9]/}
  echo $(( 15000 + 10#${digits:-0} % 20000 ))
}

xd_launch() {
  set -u
  local dry=${DRY_RUN:-0}
  cd "$REPO_DIR" || { echo "cannot cd to REPO_DIR=$REPO_DIR" >&2; return 2; }
  export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

  local job=${SLURM_JOB_ID:-0}
  local nodelist=${SLURM_JOB_NODELIST:-}
  if [ -z "$nodelist" ]; then
    [ "$dry" = 1 ] || { echo "not inside a SLURM job (submit with sbatch, or use DRY_RUN=1)" >&2; return 2; }
    nodelist=$(hostname -s)
  fi
  local -a hosts
  mapfile -t hosts < <(xd_hostnames "$nodelist")
  local nnodes=${#hosts[@]}
  local tpn=${SLURM_NTASKS_PER_NODE:-$(xd_sbatch_opt ntasks-per-node "$XD_SCRIPT")}
  tpn=${tpn%%(*}; tpn=${tpn:-1}
  local gpn=${SLURM_GPUS_PER_NODE:-$(xd_sbatch_opt gpus-per-node "$XD_SCRIPT")}
  gpn=${gpn##*:}; gpn=${gpn:-0}
  local cpt=${SLURM_CPUS_PER_TASK:-$(xd_sbatch_opt cpus-per-task "$XD_SCRIPT")}
  cpt=${cpt:-1}
  local want_nodes
  want_nodes=$(xd_sbatch_opt nodes "$XD_SCRIPT")
  if [ "$dry" = 1 ] && [ -n "$want_nodes" ] && [ "$want_nodes" != "$nnodes" ]; then
    echo "warning: node list has $nnodes host(s), the script asks for --nodes=$want_nodes" >&2
  fi
  local world=$(( nnodes * tpn ))

  export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
  export MASTER_PORT=${MASTER_PORT:-$(xd_port "$job")}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpt}
  export XPERT_PREEMPT_MARKER=${XPERT_PREEMPT_MARKER:-${TMPDIR:-/tmp}/xpert-preempt-$job}
  local kv
  for kv in "${XD_EXPORTS[@]+"${XD_EXPORTS[@]}"}"; do export "${kv?}"; done

  local -a cmd=("$PYTHON" launchers/run.py --config "$CONFIG")
  [ -n "${DS_CONFIG:-}" ] && cmd+=("ds_config=$DS_CONFIG")
  cmd+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}" "$@")
  local -a srun_cmd=(srun --nodes="$nnodes" --ntasks-per-node="$tpn" --cpus-per-task="$cpt"
                     --kill-on-bad-exit=1 --distribution=block --export=ALL)

  if [ "$dry" = 1 ]; then
    echo "DRY_RUN job $job ($(basename "$XD_SCRIPT")): $nnodes node(s) x $tpn task(s) = $world rank(s)," \
         "$gpn GPU(s)/node, $cpt CPU(s)/task"
    echo "rendezvous: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    echo "launch: $(printf '%q ' "${srun_cmd[@]}" "${cmd[@]}")"
    local n l rank
    for (( n = 0; n < nnodes; n++ )); do
      echo "node ${hosts[$n]} (node_rank $n):"
      for (( l = 0; l < tpn; l++ )); do
        rank=$(( n * tpn + l ))
        echo "  rank $rank: cd $(printf '%q' "$REPO_DIR") &&" \
             "SLURM_PROCID=$rank SLURM_LOCALID=$l SLURM_NODEID=$n SLURM_NTASKS=$world" \
             "RANK=$rank LOCAL_RANK=$l WORLD_SIZE=$world LOCAL_WORLD_SIZE=$tpn NODE_RANK=$n" \
             "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS" \
             "$(printf '%q ' "${cmd[@]}")"
      done
    done
    return 0
  fi

  local restarts=${SLURM_RESTART_COUNT:-0}
  xd_log "job $job (restart $restarts) on ${hosts[*]}: $nnodes node(s) x $tpn task(s) = $world rank(s)," \
         "master $MASTER_ADDR:$MASTER_PORT"
  xd_log "command: ${cmd[*]}"
  rm -f "$XPERT_PREEMPT_MARKER"
  "${srun_cmd[@]}" "${cmd[@]}"
  local rc=$?
  xd_log "srun finished with status $rc"
  if [ "$rc" -ne 0 ] && { [ "$rc" -eq "$XD_EXIT_PREEMPTED" ] || [ -e "$XPERT_PREEMPT_MARKER" ]; }; then
    rm -f "$XPERT_PREEMPT_MARKER"
    if [ "$restarts" -lt "${MAX_REQUEUES:-10}" ]; then
      xd_log "preempted: requeueing job $job (restart $(( restarts + 1 )) of at most ${MAX_REQUEUES:-10})"
      scontrol requeue "$job" && return 0
      xd_log "scontrol requeue failed"
    else
      xd_log "preempted, but already requeued $restarts times (MAX_REQUEUES): giving up"
    fi
  fi
  return "$rc"
}
