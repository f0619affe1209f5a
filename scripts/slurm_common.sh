# Shared by scripts/slurm_cluster.sh (one host) and scripts/cluster.sh (two hosts); sourced, not run.
# Facts behind the settings: ../shared/notes/slurm-on-this-machine.md (linuxproc process tracking
# because there are no cgroups, root as SlurmUser, no accounting storage).

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; }

install_packages() {
    have_slurm && return 0
    [ "$(id -u)" = 0 ] || { echo "$0: need root to install slurm-wlm and munge" >&2; return 1; }
    export DEBIAN_FRONTEND=noninteractive
    (   # both test clusters may come up at once (pytest workers): one apt at a time
        flock -w 600 9 || { echo "$0: apt lock /tmp/dgucdir-apt.lock held for 10 minutes" >&2; exit 1; }
        have_slurm && exit 0
        apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
            apt-get update -q >/dev/null 2>&1
            apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
        }
    ) 9>/tmp/dgucdir-apt.lock
}

# The slurm.conf lines every test cluster shares: $1 folder, $2 controller port (slurmd: $2 + 1).
common_conf() {
    cat <<EOF
SlurmctldPort=$2
SlurmdPort=$(($2 + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$1/munge/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$1/state
SlurmctldPidFile=$1/slurmctld.pid
SlurmctldLogFile=$1/log/slurmctld.log
MinJobAge=3600
SchedulerParameters=defer_batch=0
EOF
}

# submitit reads job states from sacct; without accounting storage, a stand-in answers from scontrol.
write_sacct() {
    cat > "$1/bin/sacct" <<'EOF'
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
    chmod +x "$1/bin/sacct"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munged as root on a private socket in $1/munge (its folder must be mode 755).
start_munge() {
    running "$1/munged.pid" && return 0
    munged --force --socket="$1/munge/munge.sock" --key-file=/etc/munge/munge.key \
        --pid-file="$1/munged.pid" --log-file="$1/log/munged.log" --seed-file="$1/munge/seed"
}

# Stops the daemons of pid files $2... in folder $1 and waits for them to exit.
stop_daemons() {
    local d="$1"; shift
    for name in "$@"; do running "$d/$name.pid" && kill "$(cat "$d/$name.pid")" 2>/dev/null || true; done
    for name in "$@"; do
        for _ in $(seq 1 40); do running "$d/$name.pid" || break; sleep 0.25; done
        rm -f "$d/$name.pid"
    done
}
