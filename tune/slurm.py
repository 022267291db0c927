"""``python -m tune.search --cluster slurm``: the same search as a SLURM job, submitted with submitit.

The job runs one task per node. Rank 0 starts the Ray head, waits for the other nodes, then runs
``tune.search.run_search`` against that cluster exactly as ``--cluster local`` does on this machine;
every other rank starts a Ray worker node that joins the head and stays until rank 0 is done.

Preemption and time limits: submitit signals the job (USR2) before SLURM kills it, and rank 0 requeues
it (``SearchJob`` is checkpointable). The requeued job finds the search folder and resumes it with
``Tuner.restore``: finished trials are kept, unfinished ones continue from their last epoch checkpoint.

    <search>/slurm/<job id>_0_log.out|err   the job's output (submitit), rank 0 first
    <search>/slurm/<job id>.<restart>.done  written by rank 0 when the search ends, so the workers stop

Ray traffic is authenticated with one random token per submission, passed to the job in its
environment (SLURM exports the submitting environment), never written to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import submitit

from pipeline.config import ConfigError

NODE_WAIT_S = 180
DASHBOARD_TUNNEL_PORT = 8265
CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")


@dataclass
class SlurmOptions:
    """What the search job asks SLURM for: one task per node, these CPUs/GPUs on each node."""

    nodes: int = 1
    cpus_per_node: int = 4
    gpus_per_node: int = 0
    partition: str | None = None
    time_min: int = 240
    mem_gb: int | None = None
    sbatch: dict[str, str] = field(default_factory=dict)  # any other sbatch option: --sbatch key=value
    dashboard: bool = True

    def check(self) -> None:
        for name in ("nodes", "cpus_per_node", "time_min"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")

    def executor_parameters(self) -> dict:
        parameters = {
            "nodes": self.nodes, "tasks_per_node": 1, "cpus_per_task": self.cpus_per_node,
            "timeout_min": self.time_min, "name": "facemtl-search",
            "slurm_additional_parameters": dict(self.sbatch),
        }
        if self.gpus_per_node:  # never asked for on CPU nodes: SLURM refuses an unknown gres
            parameters["gpus_per_node"] = self.gpus_per_node
        if self.partition:
            parameters["slurm_partition"] = self.partition
        if self.mem_gb:
            parameters["mem_gb"] = self.mem_gb
        return parameters


def head_port(job_id: str) -> int:
    """The Ray head's port, from the job id, so that two jobs sharing a node do not clash (as jobs/train_mtl.sh)."""
    return 20000 + int(job_id.split("_")[0]) % 20000


def node_resources() -> tuple[int, int]:
    """CPUs and GPUs of this node's allocation. ``nproc`` would see the whole machine, not the allocation."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE") or 1)
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    if gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        gpus = len([device for device in visible.split(",") if device.strip()])
    return cpus, int(gpus)


def start_ray_node(ray_args: list[str]) -> subprocess.Popen:
    """``ray start --block`` as a child of this task, so that SLURM ends it with the task."""
    ray = Path(sys.executable).with_name("ray")
    cpus, gpus = node_resources()
    command = [str(ray) if ray.exists() else "ray", "start", "--block", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
               "--disable-usage-stats", *ray_args]
    # Nothing here serves traffic, so a stopped node need not drain (Ray waits 30 s for that by default).
    environment = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, env=environment)


def wait_for_ray_nodes(address: str, count: int, head: subprocess.Popen) -> None:
    """Until ``count`` Ray nodes are alive at ``address``; the head process must stay up meanwhile."""
    import ray

    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"the Ray head exited with status {head.returncode} before the search started")
        try:
            ray.init(address=address, logging_level="ERROR")
            alive = sum(node["Alive"] for node in ray.nodes())
            if alive >= count:
                print(f"facemtl: Ray cluster up: {alive} node(s), {ray.cluster_resources()}", flush=True)
                return
            ray.shutdown()
        except ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} Ray nodes joined {address} within {NODE_WAIT_S} s")
        time.sleep(1)


def stop_ray_node(node: subprocess.Popen) -> None:
    """SIGTERM makes ``ray start --block`` stop this node's Ray processes; never ``ray stop``, which would
    also stop the Ray nodes of other jobs on the machine."""
    if node.poll() is None:
        node.terminate()
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()


def forget_cluster_address(port: int, record: Path = CURRENT_CLUSTER_FILE) -> None:
    """``ray start --head`` records its address in /tmp/ray/ray_current_cluster for later ``address="auto"``
    look-ups, and a head stopped by a signal leaves it behind. Ray Train's placement-group cleaner looks the
    cluster up that way even inside a local Ray, and would wait on this dead head: remove the record when it
    is ours. Ray writes the address it detected, which may differ from ``--node-ip-address``; the port,
    which only one head on this node can hold, tells."""
    try:
        if record.read_text().strip().rsplit(":", 1)[-1] == str(port):
            record.unlink()
    except OSError:
        pass


class SearchJob(submitit.helpers.Checkpointable):
    """What every task of the search job runs; a requeue calls it again with the same arguments."""

    def __init__(self, search_argv: list[str], search_dir: str, dashboard: bool) -> None:
        self.search_argv = search_argv
        self.search_dir = Path(search_dir)
        self.dashboard = dashboard

    def __call__(self) -> str:
        environment = submitit.JobEnvironment()
        head_ip = socket.gethostbyname(environment.hostnames[0])
        port = head_port(environment.job_id)
        done = self.search_dir / "slurm" / f"{environment.job_id}.{os.environ.get('SLURM_RESTART_COUNT', '0')}.done"
        if environment.global_rank == 0:
            return self._run_head(head_ip, port, environment.num_nodes, done)
        self._run_worker(f"{head_ip}:{port}", done)
        return str(self.search_dir)

    def _run_head(self, head_ip: str, port: int, num_nodes: int, done: Path) -> str:
        from tune.search import build_parser, run_search

        head = start_ray_node([
            "--head", f"--node-ip-address={head_ip}", f"--port={port}", f"--ray-client-server-port={port + 2}",
            f"--include-dashboard={str(self.dashboard).lower()}", "--dashboard-host=0.0.0.0", f"--dashboard-port={port + 1}",
        ])
        address = f"{head_ip}:{port}"
        os.environ["RAY_ADDRESS"] = address
        try:
            wait_for_ray_nodes(address, num_nodes, head)
            if self.dashboard:
                print(f"facemtl: Ray dashboard at http://{head_ip}:{port + 1} ; from your machine: "
                      f"ssh -N -L {DASHBOARD_TUNNEL_PORT}:{head_ip}:{port + 1} <login node>, "
                      f"then open http://localhost:{DASHBOARD_TUNNEL_PORT}", flush=True)
            return str(run_search(build_parser().parse_args(self.search_argv)))
        finally:
            import ray

            ray.shutdown()
            done.parent.mkdir(parents=True, exist_ok=True)
            done.touch()
            stop_ray_node(head)
            forget_cluster_address(port)

    def _run_worker(self, address: str, done: Path) -> None:
        deadline = time.monotonic() + NODE_WAIT_S
        node = start_ray_node([f"--address={address}"])
        while not done.exists():
            if node.poll() is not None:
                if done.exists() or time.monotonic() > deadline:
                    break
                time.sleep(2)  # the head is not up yet: try again
                node = start_ray_node([f"--address={address}"])
            time.sleep(1)
        stop_ray_node(node)


@contextlib.contextmanager
def ray_auth_environment() -> Iterator[None]:
    """One random Ray auth token for this submission, in the environment that sbatch exports to the job."""
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def submit_search(search_argv: list[str], search_dir: Path, options: SlurmOptions) -> submitit.Job:
    """Submit the search; its logs go to ``<search>/slurm/``."""
    options.check()
    executor = submitit.AutoExecutor(folder=search_dir / "slurm", cluster="slurm")
    executor.update_parameters(**options.executor_parameters())
    with ray_auth_environment():
        return executor.submit(SearchJob(search_argv, str(search_dir), options.dashboard))


def describe_submission(job: submitit.Job, search_dir: Path) -> str:
    return "\n".join([
        f"submitted SLURM job {job.job_id}",
        f"  output:      {job.paths.stdout}",
        f"  errors:      {job.paths.stderr}",
        f"  follow:      tail -f {job.paths.stdout}",
        "  Ray dashboard: its address and the ssh tunnel to reach it are printed in the output once Ray is up",
        f"  TensorBoard: tensorboard --logdir {search_dir}",
        f"  report:      python -m tune.report {search_dir}",
    ])


def slurm_options(args: argparse.Namespace) -> SlurmOptions:
    extra = {}
    for item in args.sbatch:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ConfigError(f"--sbatch expects key=value (an sbatch option without its dashes), got {item!r}")
        extra[key.lstrip("-")] = value
    return SlurmOptions(nodes=args.nodes, cpus_per_node=args.cpus_per_node, gpus_per_node=args.gpus_per_node,
                        partition=args.partition, time_min=args.time, mem_gb=args.mem_gb, sbatch=extra,
                        dashboard=args.dashboard)


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
    group.add_argument("--no-dashboard", dest="dashboard", action="store_false", help="do not start the Ray dashboard")
    group.add_argument("--wait", action="store_true", help="follow the job until it ends; exit with its status")
