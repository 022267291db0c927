# shellcheck shell=bash disable=SC2034  # variables are used by the scripts that source this
# Shared by up.sh and down.sh (sourced, not run): where the test cluster keeps its pid files and
# logs, and how its daemons are found and stopped. Daemons are only ever addressed by the PID in
# their pid file, checked against the expected process name so a recycled PID is never signalled.

RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
LOCK_FILE=/run/lock/slurm-test-cluster.lock

MUNGE_PID=/run/munge/munged.pid
MARIADB_PID=/run/mysqld/mysqld.pid
SLURMDBD_PID=$RUN_DIR/slurmdbd.pid
SLURMCTLD_PID=$RUN_DIR/slurmctld.pid
# One slurmd per node; SlurmdPidFile=$RUN_DIR/slurmd-%n.pid.
SLURMD_PID_GLOB="$RUN_DIR/slurmd-*.pid"

say() { printf '[slurm-test %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

require_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "$(basename "$0"): must run as root (it starts system daemons)" >&2
        exit 1
    fi
}

# Serialise concurrent up/down calls (e.g. two test sessions). The lock is fd 9; daemons are started
# with 9>&- so they never inherit it. A nested call (up.sh running down.sh) is already inside it.
take_lock() {
    if [[ -z ${SLURM_TEST_LOCK_HELD:-} ]]; then
        mkdir -p "$(dirname "$LOCK_FILE")"
        exec 9>"$LOCK_FILE"
        flock 9
        export SLURM_TEST_LOCK_HELD=1
    fi
}

# Files under /proc are read with `read`, never with $(<...): under `set -e` bash exits the whole
# script, silently, when $(<file) cannot open its file, even inside `if !` or `||`. A pid file left by
# a daemon that ended with an earlier session names a process that no longer exists.

# process_running PID: true while PID exists and is not a zombie. PID 1 here reaps orphans only
# every ~1.5 s, and an exited daemon has already released its ports and files.
process_running() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    [[ ${stat##*) } != Z* ]]
}

# pid_alive PIDFILE COMM: true when PIDFILE names a running process whose name is COMM.
pid_alive() {
    local pid_file=$1 comm=$2 pid
    [[ -s $pid_file ]] || return 1
    pid=$(<"$pid_file")
    pid=${pid//[[:space:]]/}
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    local running_comm
    { read -r running_comm <"/proc/$pid/comm"; } 2>/dev/null || return 1
    [[ $running_comm == "$comm" ]] && process_running "$pid"
}

# stop_daemon PIDFILE COMM: SIGTERM, wait up to 30 s for the process to go, then SIGKILL.
stop_daemon() {
    local pid_file=$1 comm=$2 pid waited=0
    if ! pid_alive "$pid_file" "$comm"; then
        rm -f "$pid_file"
        return 0
    fi
    pid=$(<"$pid_file")
    pid=${pid//[[:space:]]/}
    say "stopping $comm (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    while process_running "$pid" && ((waited < 300)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if process_running "$pid"; then
        say "$comm (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while process_running "$pid"; do sleep 0.1; done
    fi
    rm -f "$pid_file"
}

# Cancel every job and wait (up to 60 s) until squeue is empty. No-op when slurmctld is not running.
cancel_all_jobs() {
    pid_alive "$SLURMCTLD_PID" slurmctld || return 0
    local job_ids waited=0
    job_ids=$(squeue -h -o %A 2>/dev/null | sort -u)
    [[ -z $job_ids ]] && return 0
    say "cancelling $(wc -w <<<"$job_ids") job(s)"
    while [[ -n $job_ids ]]; do
        if ((waited % 50 == 0)); then
            # shellcheck disable=SC2086  # one job id per word
            scancel $job_ids 2>/dev/null || true
        fi
        if ((waited >= 600)); then
            say "WARNING: jobs still queued after 60 s: $(tr '\n' ' ' <<<"$job_ids")"
            return 0
        fi
        sleep 0.1
        waited=$((waited + 1))
        job_ids=$(squeue -h -o %A 2>/dev/null | sort -u)
    done
    say "queue is empty"
}

stop_slurmds() {
    local pid_file
    for pid_file in $SLURMD_PID_GLOB; do
        [[ -e $pid_file ]] && stop_daemon "$pid_file" slurmd
    done
    return 0
}
