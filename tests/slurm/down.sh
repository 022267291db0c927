#!/usr/bin/env bash
# Stop the one-host test SLURM cluster started by up.sh: cancel every job, wait for an empty queue
# (a job's slurmstepd outlives a stopped slurmd), then stop slurmd(s), slurmctld, slurmdbd, MariaDB
# and munge by the PIDs in their pid files and wait for each to exit. Safe to run when nothing is up.
set -euo pipefail

# shellcheck source=tests/slurm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_root
take_lock
start_s=$SECONDS

cancel_all_jobs
stop_slurmds
stop_daemon "$SLURMCTLD_PID" slurmctld
stop_daemon "$SLURMDBD_PID" slurmdbd
stop_daemon "$MARIADB_PID" mariadbd
stop_daemon "$MUNGE_PID" munged

say "test cluster is down ($((SECONDS - start_s)) s)"
