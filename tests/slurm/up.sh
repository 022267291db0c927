#!/usr/bin/env bash
# Start (or confirm) a real one-host SLURM cluster for the end-to-end tests: Debian's Slurm with
# munge, MariaDB + slurmdbd (so sacct works) and one slurmd per simulated node. Idempotent: daemons
# already running with the same configuration are left alone, so a second call returns in about a
# second. Root only; see README.md next to this file and /work/shared/notes/slurm.md.
#
#   SLURM_TEST_NODES  number of nodes (default 1). With N > 1 the nodes are node1..nodeN, one
#                     `slurmd -N nodeI` each on 127.0.0.(I+1):1700I, named in /etc/hosts.
#   SLURM_TEST_CPUS   CPUs each node advertises (default 4; may exceed the real core count).
set -euo pipefail

# shellcheck source=tests/slurm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NODES=${SLURM_TEST_NODES:-1}
CPUS=${SLURM_TEST_CPUS:-4}
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
CLUSTER=ci
PARTITION=debug
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurm-test-only  # MariaDB listens on its Unix socket only (--skip-networking)
MARIADB_SOCKET=/run/mysqld/mysqld.sock
MARIADB_LOG=/var/log/mysql/error.log
MUNGE_LOG=/var/log/munge/munged.log
SLURMDBD_LOG=$LOG_DIR/slurmdbd.log
SLURMCTLD_LOG=$LOG_DIR/slurmctld.log
SLURM_CONF=/etc/slurm/slurm.conf
SLURMDBD_CONF=/etc/slurm/slurmdbd.conf

fail() {
    local message=$1 log
    shift
    echo "[slurm-test] ERROR: $message" >&2
    for log in "$@"; do
        [[ -s $log ]] || continue
        echo "----- last 30 lines of $log -----" >&2
        tail -n 30 "$log" >&2
    done
    exit 1
}

# wait_until SECONDS COMMAND...: retry COMMAND every 0.2 s; false if it never succeeds in time.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# launch LOG COMMAND...: start a daemon detached from our stdio (a caller capturing our output must
# not wait on it) and from the lock fd.
launch() {
    local log=$1
    shift
    "$@" </dev/null >>"$log" 2>&1 9>&-
}

validate_options() {
    [[ $NODES =~ ^[1-9][0-9]?$ && $NODES -le 16 ]] || fail "SLURM_TEST_NODES must be 1..16, got '$NODES'"
    [[ $CPUS =~ ^[1-9][0-9]*$ ]] || fail "SLURM_TEST_CPUS must be a positive integer, got '$CPUS'"
}

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null) == installed ]] ||
            missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return 0
    local start_s=$SECONDS
    say "installing ${missing[*]} (apt-get update + install)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq 9>&- || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" 9>&- >/dev/null ||
        fail "apt-get install ${PACKAGES[*]} failed"
    say "packages installed ($((SECONDS - start_s)) s)"
}

node_names() {
    if ((NODES == 1)); then
        hostname -s
    else
        seq -f 'node%g' 1 "$NODES"
    fi
}

# Multi-node: node I listens on 127.0.0.(I+1); Ray and friends must resolve the name.
add_hosts_entries() {
    ((NODES > 1)) || return 0
    local index address
    for ((index = 1; index <= NODES; index++)); do
        address=127.0.0.$((index + 1))
        case $(getent hosts "node$index" | awk '{print $1}') in
            "$address") ;;
            "") echo "$address node$index" >>/etc/hosts ;;
            *) fail "/etc/hosts maps node$index elsewhere than $address; fix or remove that line" ;;
        esac
    done
}

render_slurm_conf() {
    local host mem_total_kb real_memory_mb index
    host=$(hostname -s)
    mem_total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # MemTotal, not MemAvailable, so the file (and the fast path) is stable between calls.
    real_memory_mb=$((mem_total_kb * 8 / 10 / 1024 / NODES))
    cat <<EOF
# Written by tests/slurm/up.sh (SLURM_TEST_NODES=$NODES SLURM_TEST_CPUS=$CPUS); rerun it to change.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job is held for cred_expire (default 120 s) before it may start again.
AuthInfo=cred_expire=10
MailProg=/bin/true
MpiDefault=none
# No cgroups on these machines.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Nodes may advertise more CPUs than the machine has.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
# Batch jobs are requeueable by default; requeue/cancel kill within seconds (SIGKILL after KillWait).
JobRequeue=1
KillWait=5
# A node restarted with a valid configuration comes back by itself.
ReturnToService=2
InactiveLimit=0
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd/%n
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$SLURMCTLD_LOG
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
    if ((NODES == 1)); then
        echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$real_memory_mb State=UNKNOWN"
    else
        for ((index = 1; index <= NODES; index++)); do
            echo "NodeName=node$index NodeHostname=$host NodeAddr=127.0.0.$((index + 1))" \
                "Port=$((17000 + index)) CPUs=$CPUS RealMemory=$real_memory_mb State=UNKNOWN"
        done
    fi
    echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

render_slurmdbd_conf() {
    cat <<EOF
# Written by tests/slurm/up.sh; rerun it to change.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=$SLURMDBD_LOG
PidFile=$SLURMDBD_PID
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
EOF
}

# install_file PATH MODE OWNER CONTENT: write only when different; true when it changed.
install_file() {
    local path=$1 mode=$2 owner=$3 content=$4
    if [[ -f $path ]] && [[ $(<"$path") == "$content" ]]; then
        chmod "$mode" "$path"
        chown "$owner" "$path"
        return 1
    fi
    install -D -m "$mode" -o "${owner%:*}" -g "${owner#*:}" /dev/null "$path"
    printf '%s\n' "$content" >"$path"
    return 0
}

prepare_directories() {
    install -d -m 0755 -o slurm -g slurm "$RUN_DIR" "$LOG_DIR" /var/lib/slurm /var/lib/slurm/slurmctld
    install -d -m 0755 /var/lib/slurm/slurmd
    local node
    for node in $(node_names); do
        install -d -m 0755 "/var/lib/slurm/slurmd/$node"
    done
    install -d -m 0755 -o munge -g munge /run/munge
    install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge /etc/munge
    install -d -m 0755 -o mysql -g mysql /run/mysqld /var/log/mysql
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0600 /etc/munge/munge.key
    if ! pid_alive "$MUNGE_PID" munged; then
        say "starting munged"
        launch "$LOG_DIR/munged.stderr" runuser -u munge -- /usr/sbin/munged ||
            fail "munged did not start" "$MUNGE_LOG" "$LOG_DIR/munged.stderr"
    fi
    wait_until 10 bash -c 'munge -n | unmunge' ||
        fail "munge does not encode/decode credentials" "$MUNGE_LOG" "$LOG_DIR/munged.stderr"
}

start_mariadb() {
    if pid_alive "$MARIADB_PID" mariadbd; then
        return 0
    fi
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        say "initialising the MariaDB data directory"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOG_DIR/mariadb-install-db.log" 2>&1 ||
            fail "mariadb-install-db failed" "$LOG_DIR/mariadb-install-db.log"
    fi
    say "starting MariaDB (socket only)"
    launch "$MARIADB_LOG" setsid -f /usr/sbin/mariadbd --user=mysql --skip-networking \
        --socket="$MARIADB_SOCKET" --pid-file="$MARIADB_PID" --log-error="$MARIADB_LOG"
    wait_until 60 mariadb-admin --socket="$MARIADB_SOCKET" ping ||
        fail "MariaDB did not answer on $MARIADB_SOCKET within 60 s" "$MARIADB_LOG"
    wait_until 10 pid_alive "$MARIADB_PID" mariadbd || fail "MariaDB wrote no pid file $MARIADB_PID" "$MARIADB_LOG"
    mariadb --socket="$MARIADB_SOCKET" <<EOF || fail "could not create database $DB_NAME / user $DB_USER" "$MARIADB_LOG"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

cluster_registered() {
    sacctmgr -n -P list cluster format=Cluster | grep -qx "$CLUSTER"
}

# Already running: wait_for_accounting checks it at the end.
start_slurmdbd() {
    pid_alive "$SLURMDBD_PID" slurmdbd && return 0
    say "starting slurmdbd"
    launch "$LOG_DIR/slurmdbd.stderr" /usr/sbin/slurmdbd ||
        fail "slurmdbd did not start" "$SLURMDBD_LOG" "$LOG_DIR/slurmdbd.stderr"
    wait_until 60 sacctmgr -n list cluster ||
        fail "slurmdbd did not answer sacctmgr within 60 s" "$SLURMDBD_LOG" "$LOG_DIR/slurmdbd.stderr" "$MARIADB_LOG"
}

slurmctld_up() {
    scontrol ping | grep -q 'is UP'
}

start_slurmctld() {
    if ! pid_alive "$SLURMCTLD_PID" slurmctld; then
        say "starting slurmctld"
        launch "$LOG_DIR/slurmctld.stderr" /usr/sbin/slurmctld ||
            fail "slurmctld did not start" "$SLURMCTLD_LOG" "$LOG_DIR/slurmctld.stderr"
    fi
    wait_until 30 slurmctld_up || fail "slurmctld is not UP after 30 s" "$SLURMCTLD_LOG" "$LOG_DIR/slurmctld.stderr"
}

start_slurmds() {
    local node
    for node in $(node_names); do
        pid_alive "$RUN_DIR/slurmd-$node.pid" slurmd && continue
        say "starting slurmd for node $node"
        launch "$LOG_DIR/slurmd-$node.stderr" /usr/sbin/slurmd -N "$node" ||
            fail "slurmd -N $node did not start" "$LOG_DIR/slurmd-$node.log" "$LOG_DIR/slurmd-$node.stderr"
    done
}

# True when every configured node is usable: idle, or busy with jobs that others submitted.
nodes_ready() {
    local node state
    for node in $(node_names); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1)
        [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    done
}

wait_for_nodes() {
    local node state slurmd_logs=()
    for node in $(node_names); do slurmd_logs+=("$LOG_DIR/slurmd-$node.log" "$LOG_DIR/slurmd-$node.stderr"); done
    if ! wait_until 15 nodes_ready; then
        # A node remembered as DOWN/DRAINED from an earlier run: resume it once.
        for node in $(node_names); do
            state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1)
            if [[ $state =~ ^(down|drained|draining|fail) ]]; then
                say "node $node is $state; resuming it"
                scontrol update NodeName="$node" State=RESUME || true
            fi
        done
        wait_until 45 nodes_ready ||
            fail "node(s) not idle after 60 s: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')" \
                "${slurmd_logs[@]}" "$SLURMCTLD_LOG"
    fi
}

wait_for_accounting() {
    wait_until 30 cluster_registered ||
        fail "cluster '$CLUSTER' not registered in slurmdbd after 30 s" "$SLURMCTLD_LOG" "$SLURMDBD_LOG"
    wait_until 30 sacct -n -X -a -S now-1minutes -o JobID ||
        fail "sacct does not work" "$SLURMDBD_LOG" "$SLURMCTLD_LOG"
}

main() {
    require_root
    take_lock
    validate_options
    local start_s=$SECONDS
    install_packages
    id slurm >/dev/null 2>&1 || fail "user 'slurm' missing after installing the packages"
    add_hosts_entries

    local slurm_conf_changed=0 slurmdbd_conf_changed=0
    install_file "$SLURM_CONF" 0644 root:root "$(render_slurm_conf)" && slurm_conf_changed=1
    install_file "$SLURMDBD_CONF" 0600 slurm:slurm "$(render_slurmdbd_conf)" && slurmdbd_conf_changed=1
    if ((slurm_conf_changed || slurmdbd_conf_changed)); then
        if pid_alive "$SLURMCTLD_PID" slurmctld || pid_alive "$SLURMDBD_PID" slurmdbd ||
            compgen -G "$SLURMD_PID_GLOB" >/dev/null; then
            say "configuration changed; restarting the SLURM daemons"
            cancel_all_jobs
            stop_slurmds
            stop_daemon "$SLURMCTLD_PID" slurmctld
            ((slurmdbd_conf_changed)) && stop_daemon "$SLURMDBD_PID" slurmdbd
        fi
    fi

    prepare_directories
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmds
    wait_for_nodes
    wait_for_accounting

    say "cluster '$CLUSTER' up in $((SECONDS - start_s)) s: $NODES node(s) x $CPUS CPUs, partition $PARTITION"
    sinfo -N -o '%N %T %c %m'
}

main "$@"
