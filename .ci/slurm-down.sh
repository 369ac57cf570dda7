#!/usr/bin/env bash
# .ci/slurm-down.sh — stop the daemons started by .ci/slurm-up.sh, newest first, by the PIDs
# recorded in their pid files (never by process name), then remove the namespace nodes' network
# (netns xpert-xn*, bridge xpbr0, /etc/netns/xpert-xn*). Idempotent: missing or stale pid files
# and absent namespaces are skipped. Jobs still in the queue are cancelled first so no job
# processes outlive slurmd; processes still inside a node's namespace after its slurmd stopped
# (job steps) are ended by the PIDs `ip netns pids` lists for that namespace.
set -u
PIDDIR=/run/xpert-slurm
XN_NAMES=(xn1 xn2)     # as in .ci/slurm-up.sh
BRIDGE=xpbr0

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pid() { # stop_pid PID WHAT
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 1 120); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.25; done
  echo "[slurm-down] pid $1 ($2) ignored SIGTERM for 30 s: SIGKILL"
  kill -KILL "$1" 2>/dev/null || true
}

if alive "$PIDDIR/slurmctld.pid"; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "[slurm-down] cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

# slurmd-NODE.pid: one per node; slurmd.pid: the layout of older versions of slurm-up.sh
for pf in "$PIDDIR"/slurmd-*.pid "$PIDDIR/slurmd.pid" "$PIDDIR/slurmctld.pid" "$PIDDIR/slurmdbd.pid" \
          /run/mysqld/mysqld.pid /run/munge/munged.pid; do
  [ -e "$pf" ] || continue
  if ! alive "$pf"; then
    rm -f "$pf" 2>/dev/null
    continue
  fi
  pid=$(cat "$pf")
  stop_pid "$pid" "$pf"
  rm -f "$pf"
  echo "[slurm-down] stopped pid $pid ($pf)"
done

for n in "${XN_NAMES[@]}"; do
  ns=xpert-$n
  if ip netns list 2>/dev/null | grep -qw "^$ns"; then
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      echo "[slurm-down] ending pid $pid left in namespace $ns"
      stop_pid "$pid" "in $ns"
    done
    ip netns del "$ns" && echo "[slurm-down] removed network namespace $ns"
  fi
  ip link del "xpv-$n" >/dev/null 2>&1 || true   # normally gone with the namespace
  rm -rf "/etc/netns/$ns"
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link del "$BRIDGE" && echo "[slurm-down] removed bridge $BRIDGE"
fi
rmdir /etc/netns 2>/dev/null || true
exit 0
