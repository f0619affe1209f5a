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
D="${DGUCDIR_SLURM_DIR:-/tmp/dgucdir-slurm}"
CONF="$D/slurm.conf"
PORT_BASE="${DGUCDIR_SLURM_PORT:-16817}"

env_lines() {
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$D/bin:\$PATH"
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
    [ "$(id -u)" = 0 ] || { echo "slurm_cluster: need root to install slurm-wlm and munge" >&2; return 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
        apt-get update -q >/dev/null 2>&1
        apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    }
}

write_config() {
    mkdir -p "$D"/{state,spool,log,bin,munge}
    chmod 755 "$D" "$D/munge"
    local mem
    mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 8 / 10 ))
    cat > "$CONF" <<EOF
ClusterName=dgucdir-test
SlurmctldHost=localhost
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
KillWait=30
MinJobAge=3600
SchedulerParameters=defer_batch=0
NodeName=localhost NodeHostname=$(hostname) CPUs=$(env -u OMP_NUM_THREADS nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    # submitit reads job states from sacct; without accounting storage, answer from scontrol.
    cat > "$D/bin/sacct" <<'EOF'
#!/usr/bin/env python3
import subprocess, sys
print("JobID|State|NodeList")
out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True).stdout
for line in out.splitlines():
    f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    job = f.get("JobId", "")
    if f.get("ArrayJobId") and f.get("ArrayTaskId"):
        job = f"{f['ArrayJobId']}_{f['ArrayTaskId']}"
    print(f"{job}|{f.get('JobState', 'UNKNOWN')}|{f.get('NodeList', '')}")
EOF
    chmod +x "$D/bin/sacct"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
    install_packages
    write_config
    if ! running "$D/munged.pid"; then
        munged --force --socket="$D/munge/munge.sock" --key-file=/etc/munge/munge.key \
            --pid-file="$D/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/seed"
    fi
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
    for name in slurmd slurmctld munged; do
        if running "$D/$name.pid"; then
            kill "$(cat "$D/$name.pid")" 2>/dev/null || true
        fi
    done
    for name in slurmd slurmctld munged; do
        for _ in $(seq 1 20); do running "$D/$name.pid" || break; sleep 0.25; done
        rm -f "$D/$name.pid"
    done
    rm -rf "$D/state" "$D/spool"
    echo "slurm_cluster: down" >&2
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) env_lines ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
