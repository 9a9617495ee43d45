#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for testing `scripts/sweep.sh --slurm`:
# munge, slurmctld and slurmd from Debian's packages, one node with this machine's CPUs, one
# partition, requeue allowed. Needs root (it installs packages and runs the daemons as root).
#
#   scripts/slurm-local.sh start    # install if need be, write the config, start the daemons
#   scripts/slurm-local.sh stop
#   export SLURM_CONF=/tmp/refine-poi-slurm/slurm.conf   # what `start` prints, for sbatch & co.
#
# SLURM_LOCAL_DIR sets the folder of its config, state and logs (default /tmp/refine-poi-slurm).
set -euo pipefail
dir="${SLURM_LOCAL_DIR:-/tmp/refine-poi-slurm}"
conf="$dir/slurm.conf"
[[ $(id -u) -eq 0 ]] || { echo "slurm-local.sh: run as root (it starts munged, slurmctld and slurmd)" >&2; exit 2; }

stop() {
    for pid in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
        [[ -f "$pid" ]] && kill "$(cat "$pid")" 2> /dev/null || true
    done
    pkill -x slurmd 2> /dev/null || true
    pkill -x slurmctld 2> /dev/null || true
    sleep 1
}

start() {
    if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null || ! command -v munged > /dev/null || ! command -v sbatch > /dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
    fi
    stop
    mkdir -p "$dir/ctld" "$dir/d"
    # munge: the key the package made (or a new one), and the daemon (root may run it with --force).
    [[ -f /etc/munge/munge.key ]] || mungekey --create
    mkdir -p /run/munge
    if ! munge -n > /dev/null 2>&1; then munged --force; fi
    local host cpus mem
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    cat > "$conf" <<CONF
ClusterName=refinepoi
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
# No cgroups in a container: track processes by parent, no task binding or accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$conf"
    slurmctld -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 30); do
        if sinfo -h -o '%T' 2> /dev/null | grep -qx idle; then
            echo "slurm-local.sh: node $host up ($cpus CPUs, $mem MB); export SLURM_CONF=$conf"
            return 0
        fi
        sleep 1
    done
    echo "slurm-local.sh: the node did not come up; logs: $dir/slurmctld.log, $dir/slurmd.log" >&2
    sinfo >&2 || true
    exit 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
