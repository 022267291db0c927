"""``python -m tune.search --cluster slurm``: the same search as an sbatch job on a Ray cluster of its own.

The job runs ``python -m pipeline.cluster -- <the search command with --cluster local>``: the cluster
launcher starts Ray on every node of the allocation and runs the search on the head, exactly as
``--cluster local`` runs it here. 120 s before the time limit (or on preemption) the job stops and
requeues itself; the requeued job resumes the search with ``Tuner.restore``: finished trials are kept,
unfinished ones continue from their last epoch checkpoint.

    <search>/slurm/<job id>.out   the job's output, every restart appended
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError

JOB_NAME = "facemtl-search"
FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")


@dataclass
class SlurmOptions:
    """What the search job asks SLURM for: ``nodes`` nodes with these CPUs/GPUs each."""

    nodes: int = 1
    cpus_per_node: int = 4
    gpus_per_node: int = 0
    partition: str | None = None
    time_min: int = 240
    mem_gb: int | None = None
    sbatch: dict[str, str] = field(default_factory=dict)  # any other sbatch option: --sbatch key=value

    def check(self) -> None:
        for name in ("nodes", "cpus_per_node", "time_min"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")

    def sbatch_arguments(self, output: Path) -> list[str]:
        arguments = [
            f"--job-name={JOB_NAME}", f"--nodes={self.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={self.cpus_per_node}", f"--time={self.time_min}", f"--output={output}",
            "--open-mode=append", "--signal=B:USR1@120", "--requeue",
        ]
        if self.gpus_per_node:  # never asked for on CPU nodes: SLURM refuses an unknown gres
            arguments.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.partition:
            arguments.append(f"--partition={self.partition}")
        if self.mem_gb:
            arguments.append(f"--mem={self.mem_gb}G")
        return arguments + [f"--{key}={value}" for key, value in self.sbatch.items()]


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    output: Path


def submit_search(search_argv: list[str], search_dir: Path, options: SlurmOptions) -> SubmittedJob:
    """Submit ``search_argv`` (a command) to run on the job's Ray cluster; its output goes to ``<search>/slurm/``."""
    options.check()
    logs = search_dir / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    output = logs / "%j.out"
    command = shlex.join([sys.executable, "-m", "pipeline.cluster", "--", *search_argv])
    submitted = subprocess.run(["sbatch", "--parsable", *options.sbatch_arguments(output), f"--wrap=exec {command}"],
                               capture_output=True, text=True)
    if submitted.returncode != 0:
        raise ConfigError(f"sbatch refused the search job: {submitted.stderr.strip()}")
    job_id = submitted.stdout.strip().split(";")[0]
    return SubmittedJob(job_id, logs / f"{job_id}.out")


def describe_submission(job: SubmittedJob, search_dir: Path) -> str:
    return "\n".join([
        f"submitted SLURM job {job.job_id}",
        f"  output:      {job.output}",
        f"  follow:      tail -f {job.output}",
        "  Ray dashboard: its address and the ssh tunnel to reach it are printed in the output once Ray is up",
        f"  TensorBoard: tensorboard --logdir {search_dir}",
        f"  report:      python -m tune.report {search_dir}",
    ])


def job_state(job_id: str) -> str | None:
    """The job's state in SLURM's accounting (None while it is not recorded yet)."""
    result = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True)
    states = result.stdout.split()
    return states[-1].split()[0] if states else None


def wait_for_job(job: SubmittedJob, poll_s: float = 5) -> int:
    """Follow the job (through its requeues) until it ends; 0 when it completed."""
    while True:
        queued = subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True, text=True).stdout.strip()
        state = job_state(job.job_id)
        if not queued and state in FINISHED_STATES:
            break
        time.sleep(poll_s)
    if state != "COMPLETED":
        print(f"SLURM job {job.job_id} ended {state}; its output: {job.output}", file=sys.stderr)
        return 1
    print(f"SLURM job {job.job_id} completed")
    return 0


def slurm_options(args: argparse.Namespace) -> SlurmOptions:
    extra = {}
    for item in args.sbatch:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ConfigError(f"--sbatch expects key=value (an sbatch option without its dashes), got {item!r}")
        extra[key.lstrip("-")] = value
    return SlurmOptions(nodes=args.nodes, cpus_per_node=args.cpus_per_node, gpus_per_node=args.gpus_per_node,
                        partition=args.partition, time_min=args.time, mem_gb=args.mem_gb, sbatch=extra)


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--cluster slurm")
    group.add_argument("--nodes", type=int, default=1, help="nodes; one Ray node on each")
    group.add_argument("--cpus-per-node", type=int, default=4)
    group.add_argument("--gpus-per-node", type=int, default=0)
    group.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    group.add_argument("--time", type=int, default=240, help="time limit in minutes; the job requeues itself before it")
    group.add_argument("--mem-gb", type=int, help="memory per node")
    group.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, repeatable: --sbatch account=vision --sbatch qos=high")
    group.add_argument("--wait", action="store_true", help="follow the job until it ends; exit with its status")
