#!/usr/bin/env bash
# .ci/slurm-up.sh — bring up a one-node SLURM cluster on this machine for CI and the
# tests in tests/launch: munged, mariadbd + slurmdbd (accounting), slurmctld, slurmd.
#
# * Installs the Debian packages on first use (apt), as root.
# * Starts each daemon directly (no systemd in the container) and records its PID in a
#   pid file; .ci/slurm-down.sh stops them by those PIDs only.
# * Idempotent: packages already present are not reinstalled, daemons whose recorded
#   PID is alive are left alone, and a re-run on a healthy cluster only checks the node.
#
# Environment knobs:
#   XPERT_SLURM_ACCOUNTING=1   run mariadb + slurmdbd so `sacct` works (submitit relies on
#                              it to notice jobs that die without a result; default 1)
#   XPERT_SLURM_WAIT=120       seconds to wait for the node to become usable
#
# Layout: config /etc/slurm, state /var/spool/xpert-slurm, logs /var/log/xpert-slurm,
# pid files /run/xpert-slurm (munged and mariadbd keep their usual pid files).
set -euo pipefail

ACCOUNTING=${XPERT_SLURM_ACCOUNTING:-1}
WAIT_S=${XPERT_SLURM_WAIT:-120}
NODE=$(hostname -s)
NCPU=$(nproc)
# RealMemory must not exceed what slurmd detects, keep 512 MiB for the OS
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 512 ))
STATE=/var/spool/xpert-slurm
LOGDIR=/var/log/xpert-slurm
PIDDIR=/run/xpert-slurm
MUNGE_PID=/run/munge/munged.pid
MYSQL_PID=/run/mysqld/mysqld.pid
START=$SECONDS

say() { echo "[slurm-up +$(( SECONDS - START ))s] $*"; }
die() { say "ERROR: $*"; exit 1; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
retry() { # retry SECONDS WHAT CMD...: run CMD every 0.25 s until it succeeds
  local deadline=$(( SECONDS + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { say "gave up waiting for $what"; return 1; }
    sleep 0.25
  done
}
stop_by_pidfile() {
  local pf=$1 pid
  running "$pf" || { rm -f "$pf"; return 0; }
  pid=$(cat "$pf"); kill -TERM "$pid"
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || { rm -f "$pf"; return 0; }; sleep 0.25; done
  kill -KILL "$pid" 2>/dev/null || true; rm -f "$pf"
}

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts daemons)"

# ---------------------------------------------------------------- 1. packages
want=(munge slurm-client slurmctld slurmd)
[ "$ACCOUNTING" = 1 ] && want+=(slurmdbd mariadb-server)
need=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  apt-get update -qq
  # the container's policy-rc.d refuses to start services from postinst: we start them below
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
say "packages present: $(slurmctld -V)"

# ---------------------------------------------------------------- 2. configuration
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGDIR" "$PIDDIR"
if [ "$ACCOUNTING" = 1 ]; then
  acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
conf=$(cat <<EOF
# written by xpert-dist .ci/slurm-up.sh: one node ($NODE), localhost only
ClusterName=xpertci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120): keeps requeue tests short
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$PIDDIR/slurmctld.pid
SlurmdPidFile=$PIDDIR/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# processes tracked through /proc; no cgroups: CPU binding and --mem are not enforced
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
# look at pending jobs every 2 s (defaults 60 s / 30 s): a requeued job restarts right after cred_expire
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
JobRequeue=1
$acct
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPU Sockets=1 CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
conf_changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]; then
  printf '%s\n' "$conf" > /etc/slurm/slurm.conf
  conf_changed=1
fi

# ---------------------------------------------------------------- 3. munge
[ -s /etc/munge/munge.key ] || head -c 1024 /dev/urandom > /etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge /var/lib/munge /var/log/munge
if ! running "$MUNGE_PID"; then
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock   # left by a killed munged
  runuser -u munge -- /usr/sbin/munged                              # daemonises, writes $MUNGE_PID
fi
retry 20 munged bash -c 'munge -n | unmunge' || die "munged does not answer"
say "munged pid $(cat "$MUNGE_PID")"

# ---------------------------------------------------------------- 4. accounting
if [ "$ACCOUNTING" = 1 ]; then
  install -d -o mysql -g mysql /run/mysqld
  if ! running "$MYSQL_PID"; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    setsid /usr/sbin/mariadbd --user=mysql --pid-file="$MYSQL_PID" \
      </dev/null >>"$LOGDIR/mariadb.log" 2>&1 &
  fi
  retry 60 mariadb mariadb-admin ping || die "mariadb did not start (see $LOGDIR/mariadb.log)"
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'xpertci';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  say "mariadbd pid $(cat "$MYSQL_PID")"
  dbdconf=$(cat <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOGDIR/slurmdbd.log
PidFile=$PIDDIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=xpertci
StorageLoc=slurm_acct_db
EOF
)
  if [ ! -f /etc/slurm/slurmdbd.conf ] || [ "$(cat /etc/slurm/slurmdbd.conf)" != "$dbdconf" ]; then
    printf '%s\n' "$dbdconf" > /etc/slurm/slurmdbd.conf
    stop_by_pidfile "$PIDDIR/slurmdbd.pid"
  fi
  chmod 600 /etc/slurm/slurmdbd.conf
  running "$PIDDIR/slurmdbd.pid" || slurmdbd
  retry 60 slurmdbd bash -c '</dev/tcp/127.0.0.1/6819' || die "slurmdbd not listening (see $LOGDIR/slurmdbd.log)"
  say "slurmdbd pid $(cat "$PIDDIR/slurmdbd.pid")"
fi

# ---------------------------------------------------------------- 5. slurmctld + slurmd
if [ "$conf_changed" = 1 ] && { running "$PIDDIR/slurmctld.pid" || running "$PIDDIR/slurmd.pid"; }; then
  say "slurm.conf changed: restarting slurmctld and slurmd"   # AuthInfo/accounting need a restart
  stop_by_pidfile "$PIDDIR/slurmd.pid"
  stop_by_pidfile "$PIDDIR/slurmctld.pid"
fi
if ! running "$PIDDIR/slurmctld.pid"; then
  if scontrol ping >/dev/null 2>&1; then
    die "a slurmctld not started by this script answers on this machine; stop it first"
  fi
  slurmctld
fi
retry 30 slurmctld scontrol ping || die "slurmctld does not answer (see $LOGDIR/slurmctld.log)"
running "$PIDDIR/slurmd.pid" || slurmd -N "$NODE"
retry 30 "slurmd pid file" running "$PIDDIR/slurmd.pid" || die "slurmd did not start (see $LOGDIR/slurmd.log)"
say "slurmctld pid $(cat "$PIDDIR/slurmctld.pid"), slurmd pid $(cat "$PIDDIR/slurmd.pid")"

# ---------------------------------------------------------------- 6. node ready
state=""
deadline=$(( SECONDS + WAIT_S ))
while [ $SECONDS -lt $deadline ]; do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle|mixed|allocated|completing) ;;
  *) tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
     die "node $NODE not usable (state '$state')" ;;
esac
sinfo
say "cluster ready (node $NODE: $state)"
