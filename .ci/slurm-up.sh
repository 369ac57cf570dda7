#!/usr/bin/env bash
# .ci/slurm-up.sh — bring up a local SLURM cluster on this machine for CI and the tests in
# tests/launch: munged, mariadbd + slurmdbd (accounting) and slurmctld on the host, one slurmd for
# the host itself (node `$(hostname -s)`, partition `debug`, the one-node cluster) and, by default,
# two more compute nodes `xn1` and `xn2` (partition `multi`), each a slurmd in its own network
# namespace (`ip netns`, own hostname through `unshare --uts`) joined to the host by a veth pair on
# a bridge. Ranks of a job on xn1+xn2 meet over that network exactly as on two real hosts.
#
# Network (created and removed by these scripts only): bridge xpbr0 = 10.213.0.1/24 on the host,
# netns xpert-xn1 / xpert-xn2 with interface xpeth0 = 10.213.0.11 / 10.213.0.12, and
# /etc/netns/xpert-xnN/hosts (bind-mounted over /etc/hosts for the node's slurmd and its jobs)
# naming the host and both nodes. munge's socket (/run/munge) is shared through the filesystem.
# Network namespaces need root (CAP_NET_ADMIN) and a kernel with veth + bridge.
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
#   XPERT_SLURM_WAIT=120       seconds to wait for the nodes to become usable
#   XPERT_SLURM_MULTINODE=1    add the two namespace nodes xn1, xn2 (partition multi); 0: the
#                              host node only (where network namespaces are not available)
#
# Layout: config /etc/slurm, state /var/spool/xpert-slurm, logs /var/log/xpert-slurm,
# pid files /run/xpert-slurm (munged and mariadbd keep their usual pid files).
set -euo pipefail

ACCOUNTING=${XPERT_SLURM_ACCOUNTING:-1}
WAIT_S=${XPERT_SLURM_WAIT:-120}
MULTI=${XPERT_SLURM_MULTINODE:-1}
NODE=$(hostname -s)
# namespace nodes: name -> address on the bridge (keep in sync with .ci/slurm-down.sh, slurm-node.sh)
XN_NAMES=(xn1 xn2)
XN_ADDRS=(10.213.0.11 10.213.0.12)
BRIDGE=xpbr0
HOST_ADDR=10.213.0.1
NET_PREFIX=24
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
case "$MULTI" in 0|1) ;; *) die "XPERT_SLURM_MULTINODE=$MULTI: use 1 (two namespace nodes) or 0" ;; esac

# ---------------------------------------------------------------- 1. packages
want=(munge slurm-client slurmctld slurmd)
[ "$ACCOUNTING" = 1 ] && want+=(slurmdbd mariadb-server)
[ "$MULTI" = 1 ] && want+=(iproute2)          # ip netns / veth / bridge for the namespace nodes
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

# ---------------------------------------------------------------- 2. network namespaces
# output_has PATTERN CMD...: CMD's output matches PATTERN (no pipe: grep -q + pipefail would race)
output_has() { local pat=$1 out; shift; out=$("$@" 2>/dev/null) || return 1; grep -qE -- "$pat" <<<"$out"; }
# ns_up NAME ADDR: netns xpert-NAME with xpeth0=ADDR on the bridge; each step only if missing
ns_up() {
  local name=$1 addr=$2 ns=xpert-$1 veth=xpv-$1
  output_has "^$ns( |\$)" ip netns list || ip netns add "$ns"
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip -n "$ns" link del xpeth0 >/dev/null 2>&1 || true
    ip link add "$veth" type veth peer name xpeth0 netns "$ns"
  fi
  ip link set "$veth" master "$BRIDGE"
  ip link set "$veth" up
  output_has "inet $addr/" ip -n "$ns" addr show dev xpeth0 || ip -n "$ns" addr add "$addr/$NET_PREFIX" dev xpeth0
  ip -n "$ns" link set xpeth0 up
  ip -n "$ns" link set lo up
  mkdir -p "/etc/netns/$ns"
  { echo "127.0.0.1 localhost"; echo "$HOST_ADDR $NODE"
    local i; for i in "${!XN_NAMES[@]}"; do echo "${XN_ADDRS[$i]} ${XN_NAMES[$i]}"; done
  } > "/etc/netns/$ns/hosts"
}
if [ "$MULTI" = 1 ]; then
  command -v ip >/dev/null || die "multi-node needs iproute2 (ip); or XPERT_SLURM_MULTINODE=0"
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge \
    || die "cannot create bridge $BRIDGE (needs root/CAP_NET_ADMIN); XPERT_SLURM_MULTINODE=0 for one node"
  output_has "inet $HOST_ADDR/" ip addr show dev "$BRIDGE" || ip addr add "$HOST_ADDR/$NET_PREFIX" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in "${!XN_NAMES[@]}"; do
    ns_up "${XN_NAMES[$i]}" "${XN_ADDRS[$i]}" || die "cannot set up network namespace xpert-${XN_NAMES[$i]}"
  done
  say "namespace nodes ${XN_NAMES[*]} at ${XN_ADDRS[*]} (bridge $BRIDGE $HOST_ADDR)"
  CTL_ADDR=$HOST_ADDR     # the controller must be reachable from inside the namespaces
else
  CTL_ADDR=127.0.0.1
fi

# ---------------------------------------------------------------- 3. configuration
mkdir -p /etc/slurm "$STATE/ctld" "$LOGDIR" "$PIDDIR"
if [ "$ACCOUNTING" = 1 ]; then
  acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL_ADDR
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
nodes_conf="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPU Sockets=1 CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
if [ "$MULTI" = 1 ]; then
  # the namespace nodes share this machine's CPUs and memory with the host node: each advertises
  # all CPUs (slurmd sees them all) and half of the memory
  for i in "${!XN_NAMES[@]}"; do
    nodes_conf+="
NodeName=${XN_NAMES[$i]} NodeHostname=${XN_NAMES[$i]} NodeAddr=${XN_ADDRS[$i]} CPUs=$NCPU Sockets=1 CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=$(( MEM_MB / 2 )) State=UNKNOWN"
  done
  nodes_conf+="
PartitionName=multi Nodes=$(IFS=,; echo "${XN_NAMES[*]}") Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO"
fi
conf=$(cat <<EOF
# written by xpert-dist .ci/slurm-up.sh: node $NODE (127.0.0.1)$([ "$MULTI" = 1 ] && echo " + namespace nodes ${XN_NAMES[*]} (${XN_ADDRS[*]})")
ClusterName=xpertci
SlurmctldHost=${NODE}(${CTL_ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120): keeps requeue tests short
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$PIDDIR/slurmctld.pid
# one slurmd per node on this machine: %n = the node name (slurmd -N NAME)
SlurmdSpoolDir=$STATE/d-%n
SlurmdPidFile=$PIDDIR/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
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
$nodes_conf
EOF
)
conf_changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]; then
  printf '%s\n' "$conf" > /etc/slurm/slurm.conf
  conf_changed=1
fi

# ---------------------------------------------------------------- 4. munge
[ -s /etc/munge/munge.key ] || head -c 1024 /dev/urandom > /etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge /var/lib/munge /var/log/munge
if ! running "$MUNGE_PID"; then
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock   # left by a killed munged
  runuser -u munge -- /usr/sbin/munged                              # daemonises, writes $MUNGE_PID
fi
retry 20 munged bash -c 'munge -n | unmunge' || die "munged does not answer"
say "munged pid $(cat "$MUNGE_PID")"

# ---------------------------------------------------------------- 5. accounting
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
DbdAddr=$CTL_ADDR
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
  retry 60 slurmdbd bash -c "</dev/tcp/$CTL_ADDR/6819" || die "slurmdbd not listening (see $LOGDIR/slurmdbd.log)"
  say "slurmdbd pid $(cat "$PIDDIR/slurmdbd.pid")"
fi

# ---------------------------------------------------------------- 6. slurmctld + slurmd(s)
ALL_NODES=("$NODE")
[ "$MULTI" = 1 ] && ALL_NODES+=("${XN_NAMES[@]}")
slurmd_pids=("$PIDDIR"/slurmd-*.pid "$PIDDIR/slurmd.pid")   # slurmd.pid: written by older versions
any_slurmd() { local pf; for pf in "${slurmd_pids[@]}"; do running "$pf" && return 0; done; return 1; }
if [ "$conf_changed" = 1 ] && { running "$PIDDIR/slurmctld.pid" || any_slurmd; }; then
  say "slurm.conf changed: restarting slurmctld and slurmd"   # AuthInfo/accounting/nodes need a restart
  for pf in "${slurmd_pids[@]}"; do [ -e "$pf" ] && stop_by_pidfile "$pf"; done
  stop_by_pidfile "$PIDDIR/slurmctld.pid"
fi
if ! running "$PIDDIR/slurmctld.pid"; then
  if scontrol ping >/dev/null 2>&1; then
    die "a slurmctld not started by this script answers on this machine; stop it first"
  fi
  slurmctld
fi
retry 30 slurmctld scontrol ping || die "slurmctld does not answer (see $LOGDIR/slurmctld.log)"
running "$PIDDIR/slurmd.pid" && stop_by_pidfile "$PIDDIR/slurmd.pid"   # older layout: one slurmd.pid
mkdir -p "$STATE/d-$NODE"
running "$PIDDIR/slurmd-$NODE.pid" || slurmd -N "$NODE"
if [ "$MULTI" = 1 ]; then
  for n in "${XN_NAMES[@]}"; do
    # own network namespace (nsenter, not `ip netns exec`: that remounts /sys and hides the
    # cgroup mounts slurmd needs), own hostname (UTS) and own /etc/hosts (a bind mount in a private
    # mount namespace); slurmd daemonises inside them, so its jobs run on "node $n"
    mkdir -p "$STATE/d-$n"
    running "$PIDDIR/slurmd-$n.pid" || \
      nsenter --net="/run/netns/xpert-$n" -- unshare --uts --mount --propagation slave -- \
        sh -c "mount --bind /etc/netns/xpert-$n/hosts /etc/hosts && hostname $n && exec slurmd -N $n"
  done
fi
for n in "${ALL_NODES[@]}"; do
  retry 30 "slurmd $n pid file" running "$PIDDIR/slurmd-$n.pid" || die "slurmd $n did not start (see $LOGDIR/slurmd-$n.log)"
done
say "slurmctld pid $(cat "$PIDDIR/slurmctld.pid"); slurmd pids: $(for n in "${ALL_NODES[@]}"; do printf '%s=%s ' "$n" "$(cat "$PIDDIR/slurmd-$n.pid")"; done)"

# ---------------------------------------------------------------- 7. nodes ready
node_ready() { case "$1" in idle|mixed|allocated|completing) return 0 ;; esac; return 1; }
deadline=$(( SECONDS + WAIT_S ))
for n in "${ALL_NODES[@]}"; do
  state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$(sinfo -h -N -n "$n" -o %T 2>/dev/null | head -n 1 || true)
    node_ready "$state" && break
    case "$state" in
      down*|drain*) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  if ! node_ready "$state"; then
    tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd-$n.log" >&2 || true
    die "node $n not usable (state '$state')"
  fi
done
sinfo
say "cluster ready (nodes ${ALL_NODES[*]})"
