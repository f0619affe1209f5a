#!/usr/bin/env bash
# A private two-host SLURM cluster on this machine, for the multi-node tests.
#
#   scripts/cluster.sh up               hosts, network, munged, slurmctld (on node0), one slurmd per host
#   scripts/cluster.sh down             stop everything, delete the namespaces, links and files it made
#   scripts/cluster.sh env              the environment for SLURM commands: eval "$(scripts/cluster.sh env)"
#   scripts/cluster.sh exec HOST CMD…   run CMD on HOST (node0 or node1): its network, hostname, /etc/hosts
#   scripts/cluster.sh node-down HOST   the host dies: its slurmd and every process on it killed (-9),
#                                       the node DOWN (SLURM requeues its jobs) and DRAINed
#   scripts/cluster.sh node-up HOST     the host comes back: its slurmd again, then RESUMEd once SLURM
#                                       has told it that the jobs it died with are over
#
# A host is a network namespace (its own interfaces and addresses) plus a UTS namespace (its own
# hostname); the filesystem is shared, as on a cluster with a shared filesystem. The two hosts are
# joined by one veth pair with addresses from $DGUCDIR_CLUSTER_NET (default 10.77.0.0/24) that
# exist only inside the two namespaces; nothing is configured outside them, and every command on a
# host sees that host's own /etc/hosts (from /etc/netns/<namespace>/hosts) naming node0 and node1.
# munged runs outside (its socket is a file, reachable from both hosts); slurmctld runs on node0,
# so SLURM commands are run on a host (`exec node0 sbatch …`), as on a login node. Idempotent.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/slurm_common.sh"
D="${DGUCDIR_CLUSTER_DIR:-/tmp/dgucdir-cluster}"
CONF="$D/slurm.conf"
PORT_BASE="${DGUCDIR_CLUSTER_PORT:-16827}"
NET="${DGUCDIR_CLUSTER_NET:-10.77.0}"
HOSTS=(node0 node1)
PREFIX="${DGUCDIR_CLUSTER_PREFIX:-dgucdir}"  # namespace names: dgucdir-node0, dgucdir-node1

ns() { echo "$PREFIX-$1"; }
addr() { [ "$1" = node0 ] && echo "$NET.1" || echo "$NET.2"; }
check_host() { [ "$1" = node0 ] || [ "$1" = node1 ] || { echo "cluster: unknown host '$1' (node0, node1)" >&2; exit 2; }; }

# CMD on HOST: the host's network and hostname (the UTS namespace kept in $D/uts/HOST) and, in a
# mount namespace of its own, the host's /etc/hosts. (Not `ip netns exec`: it also remounts /sys,
# which hides /sys/fs/cgroup, and slurmd does not start without it.)
on() {
    local host="$1"; shift
    nsenter --net="/run/netns/$(ns "$host")" --uts="$D/uts/$host" \
        unshare --mount --propagation private \
        sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "/etc/netns/$(ns "$host")/hosts" \
        env SLURM_CONF="$CONF" PATH="$D/bin:$PATH" "$@"
}

make_hosts() {
    mkdir -p "$D/uts"
    for host in "${HOSTS[@]}"; do
        ip netns list | grep -qw "$(ns "$host")" || ip netns add "$(ns "$host")"
        ip -n "$(ns "$host")" link set lo up
        if ! mountpoint -q "$D/uts/$host"; then
            touch "$D/uts/$host"
            unshare --uts="$D/uts/$host" hostname "$host"
        fi
        mkdir -p "/etc/netns/$(ns "$host")"
        printf '127.0.0.1 localhost\n%s node0\n%s node1\n' "$(addr node0)" "$(addr node1)" > "/etc/netns/$(ns "$host")/hosts"
    done
    if ! ip -n "$(ns node0)" link show eth0 >/dev/null 2>&1; then
        ip link add "$PREFIX-v0" netns "$(ns node0)" type veth peer name "$PREFIX-v1" netns "$(ns node1)"
        ip -n "$(ns node0)" link set "$PREFIX-v0" name eth0
        ip -n "$(ns node1)" link set "$PREFIX-v1" name eth0
        for host in "${HOSTS[@]}"; do
            ip -n "$(ns "$host")" addr add "$(addr "$host")/24" dev eth0
            ip -n "$(ns "$host")" link set eth0 up
        done
    fi
}

write_config() {
    mkdir -p "$D"/{state,spool/node0,spool/node1,log,bin,munge}
    chmod 755 "$D" "$D/munge"
    local mem cpus
    mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 4 / 10 ))
    cpus=$(env -u OMP_NUM_THREADS nproc)
    { echo "ClusterName=dgucdir-2host"; echo "SlurmctldHost=node0($(addr node0))"; common_conf "$D" "$PORT_BASE"; cat <<EOF
SlurmdSpoolDir=$D/spool/%n
SlurmdPidFile=$D/slurmd-%n.pid
SlurmdLogFile=$D/log/slurmd-%n.log
KillWait=5
SlurmdTimeout=30
NodeName=node0 NodeAddr=$(addr node0) NodeHostname=node0 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=node1 NodeAddr=$(addr node1) NodeHostname=node1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node0,node1 Default=YES MaxTime=INFINITE State=UP
EOF
    } > "$CONF"
    write_sacct "$D"
}

start_slurmd() {
    running "$D/slurmd-$1.pid" || on "$1" slurmd -f "$CONF" -N "$1"
}

wait_idle() {  # until every named host is idle (or allocated) in sinfo
    for _ in $(seq 1 120); do
        local ok=1
        for host in "$@"; do
            on node0 sinfo -h -n "$host" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)' || ok=0
        done
        [ "$ok" = 1 ] && return 0
        sleep 0.5
    done
    echo "cluster: $* did not become idle; see $D/log" >&2
    on node0 sinfo >&2 || true
    return 1
}

up() {
    [ "$(id -u)" = 0 ] || { echo "cluster: needs root (network namespaces)" >&2; exit 1; }
    install_packages
    make_hosts
    write_config
    start_munge "$D"
    running "$D/slurmctld.pid" || on node0 slurmctld -f "$CONF"
    for host in "${HOSTS[@]}"; do start_slurmd "$host"; done
    wait_idle "${HOSTS[@]}"
    echo "cluster: up, hosts node0 ($(addr node0)) and node1 ($(addr node1)), $CONF" >&2
}

node_down() {
    check_host "$1"
    # the jobs it dies with: when it re-registers, slurmctld sends it REQUEST_TERMINATE_JOB for them
    on node0 squeue -h -w "$1" -t RUNNING -o %i > "$D/spool/$1.died-with" 2>/dev/null || true
    stop_daemons "$D" "slurmd-$1"
    local pids
    pids=$(ip netns pids "$(ns "$1")" 2>/dev/null || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    on node0 scontrol update NodeName="$1" State=DOWN Reason=lost 2>/dev/null || true  # requeues its jobs
    on node0 scontrol update NodeName="$1" State=DRAIN Reason=lost 2>/dev/null || true  # out until resumed
    echo "cluster: $1 is down" >&2
}

# A host that died with a job on it gets that job's REQUEST_TERMINATE_JOB about a second after its
# slurmd re-registers. If the job has been requeued and allocated again in that second, the message
# kills the new step on the host (measured: the requeued task died 0.2 s after it started). So the
# host comes back drained and is resumed only after that message, which slurmd answers by revoking
# the job's credential and saving its credential state (the file's mtime is the sign).
node_up() {
    check_host "$1"
    local creds="$D/spool/$1/cred_state" before
    before=$(stat -c %.9Y "$creds" 2>/dev/null || echo 0)
    start_slurmd "$1"
    if [ -s "$D/spool/$1.died-with" ]; then
        local told=0
        for _ in $(seq 1 120); do
            if [ "$(stat -c %.9Y "$creds" 2>/dev/null || echo 0)" != "$before" ]; then told=1; break; fi
            sleep 0.25
        done
        [ "$told" = 1 ] || { echo "cluster: $1 was not told within 30 s that job(s) $(tr '\n' ' ' < "$D/spool/$1.died-with")are over; see $D/log" >&2; return 1; }
    fi
    rm -f "$D/spool/$1.died-with"
    on node0 scontrol update NodeName="$1" State=RESUME
    wait_idle "$1"
    echo "cluster: $1 is back" >&2
}

down() {
    for host in "${HOSTS[@]}"; do
        local pids
        pids=$(ip netns pids "$(ns "$host")" 2>/dev/null || true)
        [ -z "$pids" ] || kill $pids 2>/dev/null || true
    done
    stop_daemons "$D" slurmd-node0 slurmd-node1 slurmctld munged
    for host in "${HOSTS[@]}"; do
        local pids
        pids=$(ip netns pids "$(ns "$host")" 2>/dev/null || true)
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
        ip netns del "$(ns "$host")" 2>/dev/null || true  # its end of the veth pair goes with it
        rm -rf "/etc/netns/$(ns "$host")"
        if mountpoint -q "$D/uts/$host" 2>/dev/null; then umount "$D/uts/$host"; fi
    done
    rm -rf "$D"
    echo "cluster: down" >&2
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$CONF"; echo "export PATH=$D/bin:\$PATH" ;;
    exec) shift; check_host "${1:-}"; host="$1"; shift; on "$host" "$@" ;;
    node-down) node_down "${2:-}" ;;
    node-up) node_up "${2:-}" ;;
    *) echo "usage: $0 up|down|env|exec HOST CMD...|node-down HOST|node-up HOST" >&2; exit 2 ;;
esac
