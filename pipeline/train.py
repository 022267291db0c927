"""``python -m pipeline.train``: run the per-worker loop as a Ray ``TorchTrainer`` (DDP), or in this process.

    python -m pipeline.train --config configs/demo.yaml                     # local Ray, config's num_workers
    python -m pipeline.train --config configs/demo.yaml num_workers=2 max_epochs=3
    RAY_ADDRESS=head:6379 python -m pipeline.train --config ...            # join a cluster (jobs/train_mtl.sh)
    python -m pipeline.train --config configs/demo.yaml --local             # one process, no Ray (debugging)

A run is ``runs_dir/name``. Starting a run again with the same name resumes from its last checkpoint
(Ray Train restores it); a worker that dies is restarted by Ray from the last checkpoint, up to
``max_failures`` times. Checkpoints hold model, optimizer, scheduler, loss weights, Early Freeze state and
its snapshots, the grad scaler, the epoch/step counters and the metric history; the newest
``keep_checkpoints`` (default 2) are kept. A run folder whose checkpoints are all unreadable, or were written
under a config that changes the maths, is refused; ``--restart`` starts it over.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from pipeline.cluster import ClusterTooSmall
from pipeline.config import (
    RESUMABLE_KEYS, ConfigError, TrainConfig, config_differences, describe_differences, load_config, save_config,
    to_dict, with_absolute_paths,
)
from pipeline.data import DataConfigError, check_validation_labels, data_error_line, open_shard_set, resolve_tasks
from pipeline.loop import ResumeError, TrainingDiverged
from pipeline.provenance import record_start
from pipeline.run_summary import at_chance_warning, format_summary_table, summarize_run, write_run_summary
from pipeline.run_records import (
    BEST_MODEL_FILE,
    CONFIG_FILE,
    CheckpointsUnusable,
    STOPPED_FILE,
    LocalRun,
    RunRecorder,
    best_model_payload,
    has_records,
    latest_checkpoint,
    load_checkpoint,
    network_state_of,
    read_stop,
    record_stop,
    save_atomically,
    save_checkpoint,
)

# Errors that come back on every try: the run stops with one line, and Ray Train does not retry it.
DETERMINISTIC_STOPS = (TrainingDiverged, ResumeError, DataConfigError)


def ray_log_level() -> str:
    """Ray Train's log level for our runs: WARNING unless ``FACEMTL_RAY_LOG_LEVEL`` says otherwise."""
    return os.environ.get("FACEMTL_RAY_LOG_LEVEL", "WARNING")


def quiet_report_log() -> None:
    """Ray Train logs each report (every metric) at INFO; hold it to our level so the job's output shows our
    epoch lines only."""
    from pipeline.ray_compat import quiet_train_reports

    quiet_train_reports(ray_log_level())


def ray_worker_entry(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: the same loop on every rank; rank 0 writes checkpoint and records."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from pipeline.config import load_config_dict
    from pipeline.loop import WorkerContext, train_loop

    quiet_report_log()
    config = load_config_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    ray_context = ray.train.get_context()
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    context = WorkerContext(ray_context.get_world_rank(), ray_context.get_world_size(), device)
    recorder = RunRecorder(run_dir) if context.rank == 0 else None

    def report(metrics: dict[str, Any], payload: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="facemtl-ckpt-") as folder:
            checkpoint = None
            if recorder is not None:
                save_checkpoint(payload, Path(folder))
                checkpoint = Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
        # Records after the checkpoint is persisted: an epoch in metrics.parquet can always be resumed from.
        if recorder is not None:
            if payload["is_best"]:
                save_atomically(best_model_payload(payload, metrics["epoch"]), run_dir / BEST_MODEL_FILE)
            recorder.record_epoch(metrics, payload["run_state"]["history"])

    try:
        resume = load_resume_payload(run_dir, ray.train.get_checkpoint(), context)
        train_loop(config, context, report, resume)
    except DETERMINISTIC_STOPS as error:
        # The same run would fail the same way again: recorded for the launcher, and not a worker failure
        # that Ray Train would retry.
        if context.rank == 0:
            record_stop(run_dir, data_error_line(error) if isinstance(error, DataConfigError) else str(error))
    finally:
        if recorder is not None:
            recorder.close()


def load_resume_payload(run_dir: Path, ray_checkpoint: Any, context: Any) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from: rank 0 chooses it (the newest loadable one), the others load
    the folder rank 0 names, so that no rank can pick a newer file that appeared meanwhile."""
    import torch.distributed as dist

    chosen: list[str | None] = [None]
    payload = None
    if context.rank == 0:
        found = latest_checkpoint(run_dir, Path(ray_checkpoint.path) if ray_checkpoint else None,
                                  warn=lambda line: print(line, flush=True))
        if found is not None:
            chosen[0], payload = str(found[0]), found[1]
            print(f"resuming from {found[0]} at epoch {payload['run_state']['epoch']}", flush=True)
    if context.distributed:
        dist.broadcast_object_list(chosen, src=0)
        if context.rank != 0 and chosen[0] is not None:
            payload = load_checkpoint(Path(chosen[0]))
    return payload


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """What each Ray Train worker reserves: a CPU for the loop, one per loader process, a GPU when used."""
    return {"CPU": 1 + config.data.loader_workers, **({"GPU": 1} if config.use_gpu else {})}


def thread_environment() -> dict[str, str]:
    """What every Ray process of a run gets of this process's threading settings (pipeline/__init__.py)."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def connect_ray(min_cpus: int) -> None:
    """Join ``RAY_ADDRESS`` when set, else start a local Ray with the CPUs this process may use (a SLURM task's
    cores where SLURM binds them, else the machine's), at least ``min_cpus``."""
    import ray

    from pipeline.cluster import free_port
    from pipeline.ray_compat import check_ray, job_environment

    if ray.is_initialized():
        return
    check_ray()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address,
                 runtime_env={"env_vars": {**job_environment(gcs_address=address), **thread_environment()}})
    else:
        # address="local": a new Ray here, never another job's `ray start` cluster on this machine, which a
        # plain ray.init() would join. With its dashboard, for the person watching (Ray prints its address).
        dashboard_port = free_port()
        ray.init(address="local", num_cpus=max(len(os.sched_getaffinity(0)), min_cpus), include_dashboard=True,
                 dashboard_port=dashboard_port,
                 runtime_env={"env_vars": {**job_environment(dashboard_url=f"http://127.0.0.1:{dashboard_port}"),
                                           **thread_environment()}})


def build_trainer(config: TrainConfig, max_failures: int, callbacks: Sequence[Any] = ()) -> Any:
    """The TorchTrainer of a run: ``ray_worker_entry`` on ``num_workers`` DDP workers, checkpoints and Ray's
    records in ``runs_dir/name``. ``callbacks`` (Ray Train's ``UserCallback``) let a Tune trial hear of every
    epoch."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = config.run_dir.resolve()
    return TorchTrainer(
        ray_worker_entry,
        train_loop_config={"config": to_dict(config), "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=worker_resources(config)),
        run_config=RunConfig(
            name=config.name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints or None),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=LoggingConfig(log_level=ray_log_level()),
            callbacks=list(callbacks),
        ),
    )


def fit_with_ray(config: TrainConfig, max_failures: int) -> Any:
    """Run the TorchTrainer; joins ``RAY_ADDRESS`` when set, else starts a local Ray. A cluster that cannot
    hold the workers is refused at once (``ClusterTooSmall``), before Ray would wait for them forever."""
    from pipeline.cluster import alive_nodes, check_fits

    worker = worker_resources(config)
    connect_ray(config.num_workers * int(worker["CPU"]))
    check_fits(alive_nodes(), worker, config.num_workers, config.data.loader_workers)
    return build_trainer(config, max_failures).fit()


def check_init_from(target: Path) -> None:
    """``model.init_from`` holds a facemtl network: refused here, before any worker starts training."""
    try:
        network_state_of(target)
    except Exception as error:  # a missing or foreign file fails as OSError, KeyError, UnpicklingError, ...
        raise ConfigError(f"model.init_from {target} holds no facemtl network: "
                          f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def check_datasets(config: TrainConfig) -> None:
    """Every dataset is a shard folder and every task has training and validation labels: refused here,
    before Ray starts workers that would each fail on it."""
    if not config.data.datasets:
        raise ConfigError("data.datasets is empty: name at least one shard folder written by python -m pipeline.shard")
    if config.model.init_from:
        check_init_from(Path(config.model.init_from))
    shard_sets = [open_shard_set(path) for path in config.data.datasets]
    tasks = resolve_tasks(shard_sets, config.data.tasks)
    check_validation_labels(shard_sets, tasks)
    if config.freeze.trunk_quorum > len(tasks):  # EarlyFreeze refuses it in every mode, inside the workers
        raise ConfigError(f"freeze.trunk_quorum {config.freeze.trunk_quorum} is more than the {len(tasks)} "
                          f"task{'s' if len(tasks) != 1 else ''} these datasets label ({', '.join(tasks)}): "
                          "the trunk would never freeze")


def run_locally(config: TrainConfig) -> None:
    from pipeline.loop import WorkerContext, resolve_device, train_loop

    run = LocalRun(config.run_dir, config.keep_checkpoints)
    found = latest_checkpoint(config.run_dir, warn=print)
    resume = found[1] if found else None
    if found is not None:
        print(f"resuming from {found[0]} at epoch {resume['run_state']['epoch']}")
    try:
        train_loop(config, WorkerContext(device=resolve_device(config)), run.report, resume)
    except DETERMINISTIC_STOPS as error:
        record_stop(config.run_dir, data_error_line(error) if isinstance(error, DataConfigError) else str(error))
    finally:
        run.recorder.close()


def failure_line(error: BaseException) -> str:
    """The cause of a failed run in one line: the last line of the innermost error Ray reports."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def check_run_folder(config: TrainConfig, restart: bool) -> None:
    """A run folder with records is resumed, never silently overwritten: refused when its checkpoints are all
    unreadable or were written under a config that changes the maths; ``restart`` clears it instead."""
    run_dir = config.run_dir
    if not has_records(run_dir):
        return
    if restart:
        print(f"--restart: removing the records of {run_dir}", flush=True)
        shutil.rmtree(run_dir)
        return
    advice = f"run again with --restart to start {run_dir} over (this deletes its checkpoints and records)"
    try:
        found = latest_checkpoint(run_dir, mmap=True)
    except CheckpointsUnusable as error:
        raise ConfigError(f"{error}; {advice}") from None
    if found is None:
        raise ConfigError(f"{run_dir} holds training records but no checkpoint to resume from; {advice}")
    saved, wanted = found[1]["config"], to_dict(config)
    differences = config_differences(saved, wanted)
    if differences:
        raise ConfigError(f"{found[0]} was written under another config "
                          f"({describe_differences(saved, wanted, differences)}); "
                          f"only {', '.join(sorted(RESUMABLE_KEYS))} may change on resume. "
                          f"Use another name, or {advice}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. num_workers=2 optim.lr=1e-3")
    parser.add_argument("--local", action="store_true", help="one process, no Ray")
    parser.add_argument("--max-failures", type=int, default=2, help="worker failures Ray Train recovers from")
    parser.add_argument("--restart", action="store_true",
                        help="delete the run folder's checkpoints and records and start over (default: resume)")
    args = parser.parse_intermixed_args(argv)  # options may come between the overrides
    try:
        config = with_absolute_paths(load_config(args.config, args.overrides))
        check_datasets(config)
        check_run_folder(config, args.restart)
    except (ConfigError, DataConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_config(config, config.run_dir / CONFIG_FILE)
    record_start(config.run_dir, ["python", "-m", "pipeline.train", *(sys.argv[1:] if argv is None else argv)])
    (config.run_dir / STOPPED_FILE).unlink(missing_ok=True)
    print(f"run folder: {config.run_dir.resolve()}\nconfig:\n{Path(config.run_dir / CONFIG_FILE).read_text()}",
          flush=True)
    started = time.perf_counter()
    if args.local:
        run_locally(config)
    else:
        try:
            result = fit_with_ray(config, args.max_failures)
            error = result.error
        except ClusterTooSmall as too_small:
            print(f"error: {too_small}", file=sys.stderr)
            return 2
        except Exception as raised:  # Ray 2.60's fit() raises what earlier versions returned
            error = raised
        if error is not None and read_stop(config.run_dir) is None:
            print(f"training failed: {failure_line(error)} (the traceback is above)", file=sys.stderr)
            return 1
    stopped = read_stop(config.run_dir)
    if stopped is not None:
        print(f"error: {stopped}", file=sys.stderr)
        return 1
    summary = summarize_run(config.run_dir, [open_shard_set(path) for path in config.data.datasets])
    write_run_summary(config.run_dir, summary)
    print(f"\nbest epoch {summary['best_epoch']}, validation split:\n{format_summary_table(summary)}")
    warning = at_chance_warning(summary, str(config.run_dir))
    if warning:
        print(warning, file=sys.stderr)
    print(f"\ndone in {time.perf_counter() - started:.0f} s. Results in {config.run_dir.resolve()}:")
    print(f"  best model {BEST_MODEL_FILE}, metrics.parquet, tensorboard/ (tensorboard --logdir {config.run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
