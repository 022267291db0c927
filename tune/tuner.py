"""The Tuner of a search: the space as Tune domains, the sampler, the scheduler (FIFO, ASHA, PBT), the
trials (``tune.trainable``), restore of an interrupted search, and the result files when it ends.

``run_search`` needs only a process that may start or join Ray: ``python -m tune.search`` here, or the
same command on the Ray head of a SLURM job.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq
import yaml
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from pipeline.cluster import ClusterTooSmall, alive_nodes, describe_fit, fixes, runs_that_fit
from pipeline.config import ConfigError, TrainConfig, load_config_dict, save_config, to_dict, with_absolute_paths
from pipeline.data import check_validation_labels, open_shard_set, resolve_tasks
from pipeline.provenance import record_start
from pipeline.training_setup import declare_config_tasks
from pipeline.run_records import CONFIG_FILE, TENSORBOARD_DIR
from pipeline.train import connect_ray, worker_resources
from tune.hparams import TrialHParams, write_search_experiment
from tune.objective import EPOCHS_DONE, OBJECTIVE, load_baselines
from tune.results import (
    BASELINES_FILE, BEST_CONFIG_FILE, SPACE_FILE, TRIALS_FILE, append_trial_row, best_trial_config, trial_row,
    trial_run_dir, trials_table,
)
from tune.space import SearchSpace, load_space
from tune.trainable import train_trial

TRIAL_CPUS = 1  # a trial's own actor, the driver of its TorchTrainer (Tune's default for a function trainable)


class SearchFailed(RuntimeError):
    """No trial reported a single epoch."""


def cpus_per_trial(config: TrainConfig) -> int:
    """The trial's actor and the workers its TorchTrainer reserves."""
    return TRIAL_CPUS + config.num_workers * int(worker_resources(config)["CPU"])


def trials_at_a_time(config: TrainConfig, requested: int) -> int:
    """``requested`` trials, or as many as the cluster holds at once (0); refused at once when it holds none,
    or fewer than requested (Ray would keep the others waiting for resources, silently)."""
    nodes, worker = alive_nodes(), worker_resources(config)
    fit = runs_that_fit(nodes, worker, config.num_workers, driver={"CPU": TRIAL_CPUS})
    per_trial = f"a trial is a driver of {TRIAL_CPUS} CPU and {describe_fit(nodes, worker, config.num_workers)}"
    if fit < 1:
        raise ClusterTooSmall(f"the Ray cluster cannot hold one trial: {per_trial}. A worker needs 1 CPU for the "
                              f"loop + data.loader_workers={config.data.loader_workers}. "
                              f"Fix: {fixes(nodes, worker, config.num_workers, config.data.loader_workers)}")
    if requested > fit:
        raise ClusterTooSmall(f"--max-concurrent {requested}: the Ray cluster holds {fit} trial(s) at a time "
                              f"({per_trial}). Fix: --max-concurrent {fit}, or 0 (as many as it holds), or more nodes")
    return requested or fit


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """The space as Tune domains: log-uniform lr and λ (or λ's grid), integer patience, weighting choice."""
    param_space = {
        "lr": tune.loguniform(*space.lr),
        "lam": tune.grid_search(space.lam_grid) if space.lam_grid else tune.loguniform(*space.lam),
        "patience": tune.randint(space.patience[0], space.patience[1] + 1),  # randint excludes its upper end
    }
    if space.weighting is not None:
        param_space["weighting"] = tune.choice(space.weighting)
    return param_space


def build_search_algorithm(kind: str, seed: int, max_concurrent: int) -> Any:
    """Random search (Tune's variant generator, seeded) or Optuna, at most ``max_concurrent`` trials at a time."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if kind == "random":
        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=max_concurrent)


def build_scheduler(args: argparse.Namespace, max_epochs: int, space: SearchSpace) -> Any:
    """FIFO, ASHA, or population-based training: every ``--perturbation-interval`` epochs the trials in the
    bottom quantile adopt the epoch checkpoint of a top one and go on with perturbed lr, λ and patience."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if args.scheduler == "fifo":
        return FIFOScheduler()
    if args.scheduler == "pbt":
        mutations = {name: domain for name, domain in tune_param_space(space).items() if name != "weighting"}
        return PopulationBasedTraining(time_attr=EPOCHS_DONE, perturbation_interval=args.perturbation_interval,
                                       hyperparam_mutations=mutations, quantile_fraction=args.quantile_fraction,
                                       synch=True)
    return ASHAScheduler(time_attr=EPOCHS_DONE, max_t=max_epochs, grace_period=args.grace_period,
                         reduction_factor=args.reduction_factor)


class TrialRecords(tune.Callback):
    """The driver's records of every result: a row in ``trial_results.jsonl`` (tune/results.py says why not
    Tune's own logs) and TensorBoard HParams, each trial a session in its run's TensorBoard folder."""

    def __init__(self, search_dir: Path, sampled_names: list[str]) -> None:
        self.search_dir = search_dir
        self.sampled_names = sampled_names
        self.sessions: dict[str, TrialHParams] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        session = self.sessions.get(trial.trial_id)
        if session is None:
            log_dir = trial_run_dir(self.search_dir, trial.trial_id) / TENSORBOARD_DIR
            sample = {name: trial.config[name] for name in self.sampled_names}
            session = self.sessions[trial.trial_id] = TrialHParams(log_dir, sample)
        session.record(result["epoch"], result[OBJECTIVE])
        append_trial_row(self.search_dir, trial_row(trial.trial_id, result, self.sampled_names))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "success")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "failure")  # called once Tune has no retry left

    def _close(self, trial: Any, status: str) -> None:
        if trial.trial_id in self.sessions:
            self.sessions.pop(trial.trial_id).close(status)


@contextlib.contextmanager
def without_tune_tensorboard_logger() -> Iterator[None]:
    """Tune's own TensorBoard logger would add a second HParams session per trial (``<trial_id>``, without
    the training scalars) beside ours (``<trial_id>/train/tensorboard``, see tune/hparams.py). Tune adds
    its CSV, JSON and TensorBoard loggers unless this variable is set; the CSV and JSON ones, which its
    results are read from, are passed to the Tuner explicitly."""
    saved = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"]
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = saved


def run_search(args: argparse.Namespace, base_document: dict[str, Any], space: SearchSpace,
               command: Sequence[str] = ()) -> Path:
    """Run the search ``runs_dir/name`` (checked by the command) or resume it; returns its folder. Each start
    (``command``, commit, packages) is appended to the folder's starts.jsonl."""
    base = load_config_dict(base_document)
    baselines = load_baselines(args.baselines) if args.baselines else None
    search_dir = Path(base.runs_dir).resolve() / args.name
    resuming = tune.Tuner.can_restore(search_dir)
    if resuming:
        print(f"resuming search {search_dir} with its own {CONFIG_FILE} and {SPACE_FILE}", flush=True)
        base_document = yaml.safe_load((search_dir / CONFIG_FILE).read_text())
        space = load_space(search_dir / SPACE_FILE)
        base = load_config_dict(base_document)
        baselines = load_baselines(search_dir / BASELINES_FILE) if (search_dir / BASELINES_FILE).exists() else None

    shard_sets = [open_shard_set(path) for path in base.data.datasets]
    declare_config_tasks(base)
    tasks = resolve_tasks(shard_sets, base.data.tasks)
    check_validation_labels(shard_sets, tasks)
    if baselines and not set(baselines) <= set(tasks):
        missing = ", ".join(sorted(set(baselines) - set(tasks)))
        raise ConfigError(f"--baselines: {missing} not among the trained tasks ({', '.join(tasks)})")
    connect_ray(cpus_per_trial(base) * (args.max_concurrent or 1))
    max_concurrent = trials_at_a_time(base, args.max_concurrent)
    # Trials train in Ray's worker processes, whose working folders are not this one: absolute paths.
    trainable = tune.with_parameters(
        train_trial, base_document=to_dict(with_absolute_paths(base)), search_dir=str(search_dir), baselines=baselines,
        max_failures=args.max_failures, segment_epochs=args.perturbation_interval if args.scheduler == "pbt" else 0)
    search_dir.mkdir(parents=True, exist_ok=True)
    record_start(search_dir, command)
    if resuming:
        tuner = tune.Tuner.restore(str(search_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        save_config(base, search_dir / CONFIG_FILE)
        (search_dir / SPACE_FILE).write_text(yaml.safe_dump(to_dict(space), sort_keys=False))
        if baselines:
            (search_dir / BASELINES_FILE).write_text(yaml.safe_dump(baselines, sort_keys=False))
        print(f"search {search_dir}: {args.num_samples} sample(s), {args.scheduler} scheduler, {args.search} search, "
              f"{max_concurrent} trial(s) at a time, up to {base.max_epochs} epochs each\nspace: {to_dict(space)}",
              flush=True)
        seed = base.seed if args.seed is None else args.seed
        tuner = tune.Tuner(
            trainable,
            param_space=tune_param_space(space),
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE, mode="max", num_samples=args.num_samples,
                search_alg=build_search_algorithm(args.search, seed, max_concurrent),
                scheduler=build_scheduler(args, base.max_epochs, space),
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name=args.name, storage_path=str(search_dir.parent),
                # PBT's exploit steps copy a segment's last checkpoint; a trial otherwise resumes from its run.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if args.scheduler == "pbt" else None),
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), TrialRecords(search_dir, space.sampled_names())],
            ),
        )
    write_search_experiment(search_dir, space, tasks)
    with without_tune_tensorboard_logger():
        results = tuner.fit()
    if results.errors:
        print(f"{len(results.errors)} trial(s) failed; first error: {results.errors[0]}", file=sys.stderr)
    trials = trials_table(search_dir)
    if trials.num_rows == 0:
        raise SearchFailed(f"no trial finished an epoch; Tune's records are in {search_dir}")
    pq.write_table(trials, search_dir / TRIALS_FILE)

    best_document, best = best_trial_config(trials, base_document, args.name, space.sampled_names())
    (search_dir / BEST_CONFIG_FILE).write_text(yaml.safe_dump(best_document, sort_keys=False))
    sample = {name: best[name] for name in space.sampled_names()}
    print(f"best trial {best['trial_id']}: {OBJECTIVE} {best[OBJECTIVE]:.4f} at epoch {best['epoch']} with {sample}")
    return search_dir
