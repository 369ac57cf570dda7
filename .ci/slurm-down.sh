#!/usr/bin/env bash
# .ci/slurm-down.sh — stop the daemons started by .ci/slurm-up.sh, newest first, by the PIDs
# recorded in their pid files (never by process name). Idempotent: missing or stale pid files
# are skipped. Jobs still in the queue are cancelled first so no job processes outlive slurmd.
set -u
PIDDIR=/run/xpert-slurm

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$PIDDIR/slurmctld.pid"; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "[slurm-down] cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

for pf in "$PIDDIR/slurmd.pid" "$PIDDIR/slurmctld.pid" "$PIDDIR/slurmdbd.pid" \
          /run/mysqld/mysqld.pid /run/munge/munged.pid; do
  if ! alive "$pf"; then
    rm -f "$pf" 2>/dev/null
    continue
  fi
  pid=$(cat "$pf")
  kill -TERM "$pid"
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "[slurm-down] pid $pid ($pf) ignored SIGTERM for 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pf"
  echo "[slurm-down] stopped pid $pid ($pf)"
done
exit 0
