"""``python -m pipeline.cluster -- COMMAND``: a Ray cluster on a SLURM allocation, for the time of COMMAND.

    sbatch --nodes=2 --cpus-per-task=8 --wrap "python -m pipeline.cluster -- python -m pipeline.train --config c.yaml"

Run as (or from) the batch script of an sbatch job. On the allocation's first node it starts the Ray head,
on every other node a Ray worker (``srun``, one step per node), each bound to its own node's address
(``--node-ip-address``); it waits until every node has joined, runs COMMAND with ``RAY_ADDRESS`` set, and
stops this job's Ray nodes when COMMAND ends, never another job's (no ``ray stop``). It exits with
COMMAND's status. ``jobs/train_mtl.sh`` and ``tune.search --cluster slurm`` both start Ray this way.

- Ports come from the job id (``20000 + id mod 20000``: head, +1 dashboard, +2 Ray client), so that jobs
  sharing a node do not clash; Ray's files go to ``/tmp/ray-<job id>`` on each node, not to /tmp/ray.
- Ray's traffic is authenticated with one random token per job, passed to each ``ray start`` and to
  COMMAND in the environment, never written to a file.
- SIGTERM (scancel, preemption) stops COMMAND and Ray; USR1 (``#SBATCH --signal=B:USR1@120``, before the
  time limit) does the same and requeues the job, whose command then resumes from its last checkpoint.

Also here: what a run needs against what the cluster has (:func:`check_fits`), checked before training starts.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

NODE_WAIT_S = 180
STOP_WAIT_S = 60
FIRST_PORT = 20000
DASHBOARD_TUNNEL_PORT = 8265


def free_port() -> int:
    """A TCP port nothing listens on now (for a local Ray's dashboard, whose address its job is told)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- What a run needs against what the cluster has ------------------------------------------------------

class ClusterTooSmall(RuntimeError):
    """The Ray cluster cannot hold the run: it would wait for resources forever."""


def runs_that_fit(nodes: Sequence[dict[str, float]], worker: dict[str, float], workers: int,
                  driver: dict[str, float] | None = None, most: int = 1000) -> int:
    """How many runs of ``workers`` workers (each needing ``worker``, on one node) and an optional ``driver``
    the ``nodes`` (total resources each) hold at once, placing each worker on the node with most room."""
    free = [dict(node) for node in nodes]

    def place(need: dict[str, float]) -> bool:
        room = [node for node in free if all(node.get(kind, 0) >= amount for kind, amount in need.items())]
        if not room:
            return False
        node = max(room, key=lambda node: node.get("CPU", 0))
        for kind, amount in need.items():
            node[kind] -= amount
        return True

    for count in range(most):
        if not all(place(worker) for _ in range(workers)) or (driver and not place(driver)):
            return count
    return most


def workers_per_node(node: dict[str, float], worker: dict[str, float]) -> int:
    return min(math.floor(node.get(kind, 0) / amount) for kind, amount in worker.items() if amount > 0)


def describe_resources(resources: dict[str, float]) -> str:
    shown = [f"{resources[kind]:g} {kind}" for kind in ("CPU", "GPU") if resources.get(kind)]
    return ", ".join(shown) or "nothing"


def describe_fit(nodes: Sequence[dict[str, float]], worker: dict[str, float], workers: int) -> str:
    """The numbers behind a placement: what each worker needs, what each node has and holds."""
    held = [workers_per_node(node, worker) for node in nodes]
    return (f"{workers} worker(s) of {describe_resources(worker)} each; the cluster has {len(nodes)} node(s): "
            + "; ".join(f"{describe_resources(node)} (holds {count} worker(s))" for node, count in zip(nodes, held)))


def fixes(nodes: Sequence[dict[str, float]], worker: dict[str, float], workers: int, loader_workers: int) -> str:
    """What would make ``workers`` workers fit, spread evenly over ``nodes``: the numbers to change."""
    per_node = math.ceil(workers / len(nodes)) if nodes else workers
    smallest = min((node.get("CPU", 0) for node in nodes), default=0)
    options = []
    fitting_loaders = int(smallest // per_node) - 1
    if 0 <= fitting_loaders < loader_workers:
        options.append(f"fewer loader workers (data.loader_workers={fitting_loaders}: a worker then needs "
                       f"{fitting_loaders + 1} CPUs)")
    options.append(f"more CPUs per node (sbatch --cpus-per-task={per_node * worker.get('CPU', 1):g} holds {per_node} "
                   f"worker(s) per node)")
    if worker.get("GPU"):
        options.append(f"GPUs on every node (sbatch --gpus-per-node={per_node * worker['GPU']:g}), or use_gpu=false")
    options.append("fewer workers per node (num_workers; TRAIN_WORKERS_PER_NODE with jobs/train_mtl.sh)")
    return "; or ".join(options)


def check_fits(nodes: Sequence[dict[str, float]], worker: dict[str, float], workers: int, loader_workers: int) -> None:
    """Refuse at once a run the cluster can never place (Ray would wait for it forever, silently)."""
    if runs_that_fit(nodes, worker, workers) < 1:
        raise ClusterTooSmall(
            f"the Ray cluster cannot hold this run: {describe_fit(nodes, worker, workers)}. A worker needs 1 CPU for "
            f"the loop + data.loader_workers={loader_workers}{' and 1 GPU' if worker.get('GPU') else ''}. "
            f"Fix: {fixes(nodes, worker, workers, loader_workers)}")


def alive_nodes() -> list[dict[str, float]]:
    """Total CPUs and GPUs of each alive node of the connected Ray cluster."""
    import ray

    return [{"CPU": node["Resources"].get("CPU", 0.0), "GPU": node["Resources"].get("GPU", 0.0)}
            for node in ray.nodes() if node["Alive"]]


# --- The launcher ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    """The SLURM allocation this process runs in: job, nodes and what each node has."""

    job_id: str
    restart: int
    nodes: list[str]
    cpus_per_node: int
    gpus_per_node: int

    @classmethod
    def from_environment(cls) -> Allocation:
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            raise SystemExit("python -m pipeline.cluster runs inside a SLURM job (sbatch); SLURM_JOB_ID is not set")
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        # nproc sees the whole machine, not the allocation.
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE") or 1)
        gpus = os.environ.get("SLURM_GPUS_ON_NODE")
        if gpus is None:
            gpus = len([device for device in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if device.strip()])
        return cls(job_id, int(os.environ.get("SLURM_RESTART_COUNT", "0")), nodes, cpus, int(gpus))

    @property
    def head_port(self) -> int:
        return FIRST_PORT + int(self.job_id.split("_")[0]) % 20000


class RayCluster:
    """This job's Ray nodes: the head here, a worker on every other node, each a child process."""

    def __init__(self, allocation: Allocation) -> None:
        from pipeline.ray_compat import node_environment

        self.allocation = allocation
        self.head_ip = socket.gethostbyname(allocation.nodes[0])
        self.address = f"{self.head_ip}:{allocation.head_port}"
        self.dashboard = f"http://{self.head_ip}:{allocation.head_port + 1}"
        self.temp_dir = f"/tmp/ray-{allocation.job_id}"
        self.environment = {**os.environ, **node_environment()}
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        port = self.allocation.head_port
        self._start_node(self.allocation.nodes[0], [
            "--head", f"--port={port}", "--dashboard-host=0.0.0.0", f"--dashboard-port={port + 1}",
            f"--ray-client-server-port={port + 2}", "--include-dashboard=true"])
        import ray

        # One connection for the whole wait: a process that starts and shuts a Ray driver again and again can
        # crash with a segmentation fault later, at its exit (ray-project/ray#31145).
        try:
            self._wait_for_nodes(1)
            for node in self.allocation.nodes[1:]:
                self._start_node(node, [f"--address={self.address}"])
            self._wait_for_nodes(len(self.allocation.nodes))
        finally:
            ray.shutdown()

    def _start_node(self, node: str, role: list[str]) -> None:
        """``ray start --block`` on ``node`` as a job step of its own, bound to that node's address."""
        ray = Path(sys.executable).with_name("ray")
        command = [str(ray) if ray.exists() else "ray", "start", "--block", "--disable-usage-stats",
                   f"--node-ip-address={socket.gethostbyname(node)}", f"--num-cpus={self.allocation.cpus_per_node}",
                   f"--num-gpus={self.allocation.gpus_per_node}", f"--temp-dir={self.temp_dir}", *role]
        step = ["srun", "--nodes=1", "--ntasks=1", "--overlap", f"--nodelist={node}", *command]
        self.processes.append(subprocess.Popen(step, stdin=subprocess.DEVNULL, env=self.environment))

    def _wait_for_nodes(self, count: int) -> None:
        """Until ``count`` Ray nodes are alive; every node's process must stay up meanwhile. Connects this
        process to the cluster as a driver once, when the head answers; ``start`` disconnects it."""
        import ray

        deadline = time.monotonic() + NODE_WAIT_S
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a Ray node exited with status {process.returncode} before the cluster was up "
                                       f"({' '.join(process.args[-4:])}); its log is above")
            try:
                if not ray.is_initialized():
                    ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
                alive = [node for node in ray.nodes() if node["Alive"]]
                if len(alive) >= count:
                    addresses = sorted(node["NodeManagerAddress"] for node in alive)
                    each = f"{self.allocation.cpus_per_node} CPUs and {self.allocation.gpus_per_node} GPUs each"
                    print(f"facemtl: Ray cluster up: {len(alive)} node(s) {addresses}, {each}", flush=True)
                    return
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {count} Ray nodes joined {self.address} within {NODE_WAIT_S} s")
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM to each node's step: ``ray start --block`` then stops that node's Ray processes."""
        for process in reversed(self.processes):  # workers first, the head last
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run(command: list[str]) -> int:
    """Start the cluster, run ``command`` against it, stop the cluster; the command's exit status."""
    allocation = Allocation.from_environment()  # outside a SLURM job: an error, and nothing changed here
    # Before Ray is imported here: it reads the token once. Every `ray start` and the command inherit it.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
    from pipeline.ray_compat import check_ray

    check_ray()
    print(f"facemtl: job {allocation.job_id} (restart {allocation.restart}) on {len(allocation.nodes)} node(s) "
          f"{allocation.nodes}, {allocation.cpus_per_node} CPUs and {allocation.gpus_per_node} GPUs per node",
          flush=True)
    cluster = RayCluster(allocation)
    requeue = False
    running: subprocess.Popen | None = None

    def on_signal(number: int, frame: object) -> None:
        nonlocal requeue
        requeue = number == signal.SIGUSR1
        print(f"facemtl: {signal.Signals(number).name}: stopping"
              + ("; the job requeues itself and resumes" if requeue else "; resubmit to resume"), flush=True)
        if running is None:
            raise KeyboardInterrupt  # still starting Ray: stop it
        if running.poll() is None:
            running.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)
    status = 1
    try:
        cluster.start()
        port = allocation.head_port + 1
        print(f"facemtl: Ray dashboard at {cluster.dashboard} ; from your machine: ssh -N -L "
              f"{DASHBOARD_TUNNEL_PORT}:{cluster.head_ip}:{port} <login node>, then open "
              f"http://localhost:{DASHBOARD_TUNNEL_PORT}", flush=True)
        running = subprocess.Popen(command, env={**cluster.environment, "RAY_ADDRESS": cluster.address})
        status = running.wait()
        print(f"facemtl: {' '.join(command[:3])} ... exited with status {status}", flush=True)
    except KeyboardInterrupt:
        status = 143
    finally:
        cluster.stop()
    if requeue:
        subprocess.run(["scontrol", "requeue", allocation.job_id], check=False)
        return 0
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run against the cluster")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- python -m pipeline.train --config c.yaml")
    return run(command)


if __name__ == "__main__":
    sys.exit(main())
