#!/usr/bin/env bash
# A real, private, one-node SLURM cluster on this machine, for the launcher's tests.
#
#   scripts/slurm_cluster.sh up      install (Debian packages) if needed, start munged, slurmctld, slurmd
#   scripts/slurm_cluster.sh down    stop them (by their pid files)
#   scripts/slurm_cluster.sh env     print the environment to use it: eval "$(scripts/slurm_cluster.sh env)"
#
# Idempotent. Everything lives in $DGUCDIR_SLURM_DIR (default /tmp/dgucdir-slurm): its own
# slurm.conf (SLURM_CONF), non-default ports and a private munge socket, so it never meets
# another SLURM on the machine. Settings follow what was measured on this machine kind
# (../shared/notes/slurm-on-this-machine.md): linuxproc process tracking (no cgroups), root as
# SlurmUser, and a stand-in `sacct` (there is no accounting storage) so submitit can see job states.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/slurm_common.sh"
D="${DGUCDIR_SLURM_DIR:-/tmp/dgucdir-slurm}"
CONF="$D/slurm.conf"
PORT_BASE="${DGUCDIR_SLURM_PORT:-16817}"

env_lines() {
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$D/bin:\$PATH"
}

write_config() {
    mkdir -p "$D"/{state,spool,log,bin,munge}
    chmod 755 "$D" "$D/munge"
    local mem
    mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 8 / 10 ))
    { echo "ClusterName=dgucdir-test"; echo "SlurmctldHost=localhost"; common_conf "$D" "$PORT_BASE"; cat <<EOF
SlurmdSpoolDir=$D/spool
SlurmdPidFile=$D/slurmd.pid
SlurmdLogFile=$D/log/slurmd.log
KillWait=30
NodeName=localhost NodeHostname=$(hostname) CPUs=$(env -u OMP_NUM_THREADS nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    } > "$CONF"
    write_sacct "$D"
}

up() {
    install_packages
    write_config
    start_munge "$D"
    export SLURM_CONF="$CONF"
    running "$D/slurmctld.pid" || slurmctld -f "$CONF"
    running "$D/slurmd.pid" || slurmd -f "$CONF"
    for _ in $(seq 1 60); do
        if sinfo -h -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
            echo "slurm_cluster: up ($CONF)" >&2
            return 0
        fi
        sleep 0.5
    done
    echo "slurm_cluster: node did not become idle; see $D/log" >&2
    sinfo >&2 || true
    return 1
}

down() {
    stop_daemons "$D" slurmd slurmctld munged
    rm -rf "$D/state" "$D/spool"
    echo "slurm_cluster: down" >&2
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) env_lines ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
