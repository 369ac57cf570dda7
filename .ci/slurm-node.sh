#!/usr/bin/env bash
# .ci/slurm-node.sh — act on one namespace node (xn1, xn2) of the cluster of .ci/slurm-up.sh.
#
#   bash .ci/slurm-node.sh status NODE   # slurmd pid, address, processes in its namespace
#   bash .ci/slurm-node.sh crash NODE    # lose the node: cable out, then SIGKILL everything on it
#   bash .ci/slurm-up.sh                 # brings a crashed node back (cable in, slurmd started)
#
# `crash` takes the node's link down first (xpv-NODE on the host bridge), so its peers see
# neither a FIN nor a reset, as when a machine loses power, and then kills, by PID, every
# process whose network namespace is the node's (`ip netns pids`): its slurmd, the job steps
# and the ranks. Nothing outside that namespace is touched.
set -u
cmd=${1:-}; node=${2:-}
case "$node" in xn1|xn2) ;; *) echo "usage: $0 status|crash xn1|xn2" >&2; exit 2 ;; esac
ns=xpert-$node
ip netns list 2>/dev/null | grep -qw "^$ns" || { echo "node $node: no namespace $ns (run .ci/slurm-up.sh)" >&2; exit 1; }
pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
case "$cmd" in
  status)
    echo "node $node: namespace $ns, $(ip -n "$ns" -br -4 addr show dev xpeth0 2>/dev/null)"
    echo "slurmd pid: $(cat "/run/xpert-slurm/slurmd-$node.pid" 2>/dev/null || echo none)"
    echo "link: $(ip -br link show "xpv-$node" 2>/dev/null | awk '{print $2}')"
    echo "processes: ${pids:-none}"
    ;;
  crash)
    ip link set "xpv-$node" down
    # shellcheck disable=SC2086
    [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null
    rm -f "/run/xpert-slurm/slurmd-$node.pid"
    echo "node $node crashed: link down, killed pids ${pids:-none}"
    ;;
  *) echo "usage: $0 status|crash xn1|xn2" >&2; exit 2 ;;
esac
