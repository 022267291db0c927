"""``python -m tune.search``: Ray Tune over lr, λ and Early-Freeze patience; every trial a Ray Train run.

    python -m tune.search --config configs/demo.yaml --num-samples 8                  # ASHA, random search
    python -m tune.search --config configs/demo.yaml --grid thesis --scheduler fifo    # λ ∈ {0.001, 0.01, 0.1, 1}
    python -m tune.search --config configs/demo.yaml max_epochs=10 space.lr=[1e-4,1e-2] space.weighting=[learned,equal]

Each trial trains the base config with its sampled values on a ``TorchTrainer`` of its own (the workers
of ``pipeline.train``). The objective, reported every epoch, is the mean over tasks of
``pipeline.metrics.normalized_score`` (accuracy; ``10 / (10 + MAE)`` for age); ASHA stops trials whose
objective trails the others at the same epoch. A search is ``runs_dir/name``:

    <search>/config.yaml, space.yaml     the base training config and the search space
    <search>/<trial_id>/                 Tune's results of one trial; its training run in train/
    <search>/trials.parquet              one row per trial and epoch: hyperparameters, objective, val metrics
    <search>/best_config.yaml            the best trial's config, for ``python -m pipeline.train --config``

Starting a search again with the same name resumes it (``Tuner.restore``): finished trials are kept,
unfinished ones continue from their last epoch checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from ray.train import UserCallback
from ray.tune import Trainable
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.result import RESULT_DUPLICATE
from ray.util.placement_group import remove_placement_group
from ray.util.queue import Queue

from pipeline.config import ConfigError, TrainConfig, load_config, load_config_dict, save_config, to_dict, with_absolute_paths
from pipeline.metrics import delta_m, normalized_score
from pipeline.data import DataConfigError, check_validation_labels, open_shard_set, resolve_tasks
from pipeline.run_records import (
    CHECKPOINT_FILE, CONFIG_FILE, TENSORBOARD_DIR, checkpoint_folders, latest_checkpoint, load_checkpoint, save_checkpoint,
)
from pipeline.schema import get_task
from pipeline.train import build_trainer, connect_ray, ray_worker_entry, worker_resources
from tune.hparams import OBJECTIVE, TrialHParams, write_search_experiment
from tune.slurm import add_slurm_arguments, describe_submission, slurm_options, submit_search
from tune.space import GRIDS, OVERRIDE_PREFIX, SearchSpace, apply_sample, check_against_config, load_space

EPOCHS_DONE = "epochs_done"  # ASHA's clock, in epochs
TRIAL_RUN_NAME = "train"
TRIALS_FILE = "trials.parquet"
BEST_CONFIG_FILE = "best_config.yaml"
SPACE_FILE = "space.yaml"
BASELINES_FILE = "baselines.yaml"
MEAN_SCORE = "mean_score"  # mean normalized score over tasks, in [0, 1]
DELTA_M = "delta_m"  # % improvement over single-task baselines, with --baselines
HPARAM_PREFIX = "hparam/"  # every result carries the values its epoch was trained with (PBT changes them)


def search_objective(metrics: dict[str, Any]) -> float:
    """Mean over the validated tasks of their normalized score (higher is better, each in [0, 1])."""
    tasks = sorted({key.split("/")[1] for key in metrics if key.startswith("val/") and key.endswith("/loss")})
    return sum(normalized_score(get_task(task), _task_metrics(metrics, task)) for task in tasks) / len(tasks)


def main_metrics(metrics: dict[str, Any], tasks: Iterable[str]) -> dict[str, float]:
    """Each task's main validation metric (MAE for age, accuracy otherwise)."""
    return {task: metrics[f"val/{task}/{get_task(task).metric}"] for task in tasks}


def load_baselines(path: Path) -> dict[str, float]:
    """Single-task baseline results: a YAML mapping of task to its main metric (age: MAE in years, others:
    accuracy), e.g. from ``python -m pipeline.experiments mtl-vs-single``. Checked before anything starts."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--baselines {path}: {error}") from None
    if not isinstance(document, dict) or not document:
        raise ConfigError(f"--baselines {path}: expected a mapping of task to its single-task metric, e.g. 'age: 5.8'")
    baselines = {}
    for task, value in document.items():
        try:
            spec = get_task(str(task))
        except KeyError as error:
            raise ConfigError(f"--baselines {path}: {error.args[0]}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"--baselines {path}: {task}: expected its {spec.metric} as a number > 0, got {value!r}")
        baselines[spec.name] = float(value)
    return baselines


def _task_metrics(metrics: dict[str, Any], task: str) -> dict[str, float]:
    prefix = f"val/{task}/"
    return {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}


def tune_result(epoch_metrics: dict[str, Any], baselines: dict[str, float] | None = None) -> dict[str, Any]:
    """What Tune hears of one epoch: the loop's metrics (lists as JSON, as in metrics.parquet), the mean
    normalized score and, given single-task baselines, Δm; the objective is Δm when there are baselines."""
    result = {key: json.dumps(value) if isinstance(value, list) else value for key, value in epoch_metrics.items()}
    scores = {MEAN_SCORE: search_objective(result)}
    if baselines:
        scores[DELTA_M] = delta_m(main_metrics(result, baselines), baselines)
    objective = scores[DELTA_M] if baselines else scores[MEAN_SCORE]
    return result | scores | {OBJECTIVE: objective, EPOCHS_DONE: result["epoch"] + 1}


class SearchTrial(Trainable):
    """One trial: the base config with the sampled values, trained by a TorchTrainer in a thread of this
    trial's actor; each ``step`` hands Tune one epoch.

    A class and not a function trainable so that a trial Tune stops (ASHA) ends its Train run in
    ``cleanup``. In Ray 2.60 the Train controller would otherwise die with this actor and leave behind its
    workers' placement group, and a detached cleaner that waits for the dashboard's state API, which these
    clusters do not run (ray-project/ray#54305): later trials would wait for those CPUs forever.
    """

    def setup(self, sample: dict[str, Any], base_document: dict[str, Any], search_dir: str,
              baselines: dict[str, float] | None = None) -> None:
        self.baselines = baselines
        self.sample = dict(sample)
        # Into the search folder itself, not Tune's per-session staging folder: a resumed trial finds its
        # checkpoints there, and nothing is copied twice.
        trial_run = {"runs_dir": str(Path(search_dir) / self.trial_id), "name": TRIAL_RUN_NAME}
        self.train_config = load_config_dict(apply_sample(base_document, sample) | trial_run)
        save_config(self.train_config, self.train_config.run_dir / CONFIG_FILE)
        # A trial resumed after an interruption tells Tune its finished epochs again, then trains on.
        found = latest_checkpoint(self.train_config.run_dir)
        self.finished_epochs = deque(found[1]["run_state"]["history"] if found else [])
        # This trial's row in TensorBoard's HParams view, in the run folder of its training scalars.
        self.hparams = TrialHParams(self.train_config.run_dir / TENSORBOARD_DIR, sample)
        self.failed = False
        self.events = Queue(actor_options={"num_cpus": 0})  # from the Train controller and rank 0
        self.training: threading.Thread | None = None
        self.workers_placement_group = None
        self.epochs_done = 0
        self.last_checkpoint: str | None = str(found[0]) if found else None

    def step(self) -> dict[str, Any]:
        if self.finished_epochs:
            return self._epoch_result(self.finished_epochs.popleft())
        if self.training is None:
            self.training = threading.Thread(target=self._train, name="train-run", daemon=True)
            self.training.start()
        while True:
            kind, payload = self.events.get()
            if kind == "placement_group":
                self.workers_placement_group = payload
            elif kind == "epoch":
                epoch_metrics, self.last_checkpoint = payload
                return self._epoch_result(epoch_metrics)
            elif kind == "failed":
                self.failed = True  # not closed as failed: Tune may retry it (TensorBoard keeps the first end)
                raise payload
            else:
                return {RESULT_DUPLICATE: True}  # finished: Tune repeats the last epoch's result as final

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """Only population-based training asks for this: the epoch checkpoint a trial last reported, which
        another trial may adopt (``load_checkpoint``)."""
        if self.last_checkpoint is None:
            raise RuntimeError(f"trial {self.trial_id} has no epoch checkpoint to save yet")
        shutil.copy2(Path(self.last_checkpoint) / CHECKPOINT_FILE, Path(checkpoint_dir) / CHECKPOINT_FILE)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """PBT's exploit (or Tune's restore): continue from ``checkpoint``'s epoch with this trial's own
        hyperparameters. The state is put where the Train run resumes from, as its newest checkpoint, with
        the optimizer's learning rates set to this trial's (an adopted optimizer would keep the donor's)."""
        payload = load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE)
        set_learning_rates(payload["optimizer"], self.train_config)
        payload["freeze"]["patience"] = self.train_config.freeze.patience  # counters go on, against this patience
        payload["config"] = to_dict(self.train_config)  # the run continues under this trial's own config
        for own in checkpoint_folders(self.train_config.run_dir):  # superseded: the adopted state is the run now
            shutil.rmtree(own)
        adopted = self.train_config.run_dir / f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
        save_checkpoint(payload, adopted)
        self.finished_epochs.clear()  # Tune knows the adopted epochs already
        self.last_checkpoint = str(adopted)
        self.epochs_done = payload["run_state"]["epoch"]

    def cleanup(self) -> None:
        """Stopped while training: remove the workers, so that the Train run fails and shuts down itself.

        A run stopped after its last epoch (ASHA's max_t) is already shutting down and is only waited for.
        """
        if not self.failed:
            self.hparams.close("success")
        if self.training is None or not self.training.is_alive():
            return
        if self.workers_placement_group is not None and self.epochs_done < self.train_config.max_epochs:
            remove_placement_group(self.workers_placement_group)
        self.training.join(timeout=120)

    def _epoch_result(self, epoch_metrics: dict[str, Any]) -> dict[str, Any]:
        result = tune_result(epoch_metrics, self.baselines) | {f"{HPARAM_PREFIX}{k}": v for k, v in self.sample.items()}
        self.epochs_done = result[EPOCHS_DONE]
        self.hparams.record(result["epoch"], result[OBJECTIVE])
        return result

    def _train(self) -> None:
        try:
            build_trial_trainer(self.train_config, self.events).fit()
        except Exception as error:  # Tune's retry resumes the trial from its last epoch checkpoint
            self.events.put(("failed", error))
        else:
            self.events.put(("finished", None))


def set_learning_rates(optimizer_state: dict[str, Any], config: TrainConfig) -> None:
    """The learning rates ``build_optimizer`` gives ``config``, in a saved optimizer state (by group name)."""
    rates = {"net": config.optim.lr, "weighting": config.optim.weighting_lr or config.optim.lr}
    for group in optimizer_state["param_groups"]:
        group["lr"] = rates[group["name"]]


class EpochsToTrial(UserCallback):
    """Runs in the Train controller: hands rank 0's metrics of every epoch to the trial."""

    def __init__(self, events: Queue) -> None:
        self.events = events

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.events.put(("epoch", (metrics[0], checkpoint.path if checkpoint is not None else None)))


def build_trial_trainer(config: TrainConfig, events: Queue):
    """The TorchTrainer of ``pipeline.train``, reporting every epoch to the trial.

    No Train-level restarts (max_failures 0): a worker failure fails the trial and Tune retries it, so a
    trial has one worker group at a time, the one its cleanup removes.
    """
    return build_trainer(config, max_failures=0, entry=trial_worker_entry, loop_extras={"events": events},
                         callbacks=[EpochsToTrial(events)])


def trial_worker_entry(loop_config: dict[str, Any]) -> None:
    """``pipeline.train.ray_worker_entry``, once rank 0 has told the trial where its workers are placed."""
    import ray.train
    from ray.util import get_current_placement_group

    if ray.train.get_context().get_world_rank() == 0:
        loop_config["events"].put(("placement_group", get_current_placement_group()))
    ray_worker_entry(loop_config)


def cpus_per_trial(config: TrainConfig) -> int:
    """The trial's actor (1 CPU, Tune's default) and the workers its TorchTrainer reserves."""
    return 1 + config.num_workers * int(worker_resources(config)["CPU"])


def trials_at_a_time(config: TrainConfig) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once; at least one."""
    import ray

    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 0)) // cpus_per_trial(config)
    if config.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0)) // config.num_workers)
    return max(1, fits)


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """The space as Tune domains: log-uniform lr and λ (or λ's grid), integer patience, weighting choice."""
    from ray import tune

    param_space = {
        "lr": tune.loguniform(*space.lr),
        "lam": tune.grid_search(space.lam_grid) if space.lam_grid else tune.loguniform(*space.lam),
        "patience": tune.randint(space.patience[0], space.patience[1] + 1),  # randint excludes its upper end
    }
    if space.weighting is not None:
        param_space["weighting"] = tune.choice(space.weighting)
    return param_space


def check_search_options(args: argparse.Namespace, space: SearchSpace, max_epochs: int) -> None:
    """Scheduler and sampler options that cannot work, refused before Ray starts."""
    if args.scheduler == "asha" and not 1 <= args.grace_period <= max_epochs:
        raise ConfigError(f"--grace-period must be between 1 and max_epochs ({max_epochs}), got {args.grace_period}")
    if args.scheduler == "pbt":
        if space.lam_grid or args.search == "optuna":
            raise ConfigError("--scheduler pbt samples and perturbs the values itself: leave out --grid, "
                              "space.lam_grid and --search optuna")
        if not 1 <= args.perturbation_interval < max_epochs:
            raise ConfigError(f"--perturbation-interval must be between 1 and max_epochs - 1 ({max_epochs - 1}), "
                              f"got {args.perturbation_interval}")
        if not 0 < args.quantile_fraction <= 0.5:
            raise ConfigError(f"--quantile-fraction must be in (0, 0.5], got {args.quantile_fraction}")
    if args.reduction_factor <= 1:
        raise ConfigError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    if args.search == "optuna":
        if space.lam_grid:
            raise ConfigError("--search optuna samples λ itself: leave out --grid and space.lam_grid")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("--search optuna needs optuna: pip install 'facemtl[tune]'") from None


def build_search_algorithm(kind: str, seed: int, max_concurrent: int):
    """Random search (Tune's variant generator, seeded) or Optuna, at most ``max_concurrent`` trials at a time."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if kind == "random":
        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=max_concurrent)


def build_scheduler(args: argparse.Namespace, max_epochs: int, space: SearchSpace):
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


def trials_table(results, sampled_names: list[str]) -> pa.Table:
    """One row per trial and epoch: trial_id, epoch, sampled hyperparameters, objective, val metrics.

    A trial resumed after an interruption reports its last epochs again; the latest report wins.
    """
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for result in results:
        if result.metrics_dataframe is None:
            continue
        trial_id = Path(result.path).name  # the trial's folder, named by trial_dirname_creator
        final_sample = {name: result.config[name] for name in sampled_names}
        for report in result.metrics_dataframe.to_dict("records"):
            # The values the epoch was trained with: PBT changes them during a trial.
            sample = {name: report.get(f"{HPARAM_PREFIX}{name}", value) for name, value in final_sample.items()}
            measured = {key: value for key, value in report.items()
                        if key.startswith(("val/", "weights/")) or key in (MEAN_SCORE, DELTA_M)}
            epoch = int(report["epoch"])
            rows[trial_id, epoch] = {"trial_id": trial_id, "epoch": epoch, **sample, OBJECTIVE: report[OBJECTIVE], **measured}
    return pa.Table.from_pylist([rows[key] for key in sorted(rows)])


def best_trial_config(results, base_document: dict[str, Any], name: str) -> tuple[dict[str, Any], Any]:
    """The base config with the best trial's values (highest objective at any epoch), run ``<name>-best``."""
    best = results.get_best_result(metric=OBJECTIVE, mode="max", scope="all")
    document = apply_sample(base_document, best.config) | {"name": f"{name}-best"}
    return to_dict(load_config_dict(document)), best


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


class SearchFailed(RuntimeError):
    """No trial reported a single epoch."""


def run_search(args: argparse.Namespace) -> Path:
    """Validate, then run the search ``runs_dir/name`` or resume it; returns its folder.

    Needs only a process that may start or join Ray, so a SLURM job (rank 0) can call it as well.
    """
    from ray import tune

    base_document, space = _load_base_and_space(args)
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
    check_search_options(args, space, base.max_epochs)

    shard_sets = [open_shard_set(path) for path in base.data.datasets]
    tasks = resolve_tasks(shard_sets, base.data.tasks)
    check_validation_labels(shard_sets, tasks)
    if baselines and not set(baselines) <= set(tasks):
        missing = ", ".join(sorted(set(baselines) - set(tasks)))
        raise ConfigError(f"--baselines: {missing} not among the trained tasks ({', '.join(tasks)})")
    connect_ray(cpus_per_trial(base) * (args.max_concurrent or 1))
    max_concurrent = args.max_concurrent or trials_at_a_time(base)
    # Trials train in Ray's worker processes, whose working folders are not this one: absolute paths.
    trial_document = to_dict(with_absolute_paths(base))
    trainable = tune.with_parameters(SearchTrial, base_document=trial_document, search_dir=str(search_dir),
                                     baselines=baselines)
    if resuming:
        tuner = tune.Tuner.restore(str(search_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        search_dir.mkdir(parents=True, exist_ok=True)
        save_config(base, search_dir / CONFIG_FILE)
        (search_dir / SPACE_FILE).write_text(yaml.safe_dump(to_dict(space), sort_keys=False))
        if baselines:
            (search_dir / BASELINES_FILE).write_text(yaml.safe_dump(baselines, sort_keys=False))
        print(f"search {search_dir}: {args.num_samples} sample(s), {args.scheduler} scheduler, {args.search} search, "
              f"{max_concurrent} trial(s) at a time, up to {base.max_epochs} epochs each\nspace: {to_dict(space)}", flush=True)
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
                # A trial's state is its Train run folder, which setup() resumes from: no Tune checkpoints.
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
            ),
        )
    write_search_experiment(search_dir, space, tasks)
    with without_tune_tensorboard_logger():
        results = tuner.fit()
    if results.errors:
        print(f"{len(results.errors)} trial(s) failed; first error: {results.errors[0]}", file=sys.stderr)
    trials = trials_table(results, space.sampled_names())
    if trials.num_rows == 0:
        raise SearchFailed(f"no trial finished an epoch; Tune's records are in {search_dir}")
    pq.write_table(trials, search_dir / TRIALS_FILE)

    best_document, best = best_trial_config(results, base_document, args.name)
    (search_dir / BEST_CONFIG_FILE).write_text(yaml.safe_dump(best_document, sort_keys=False))
    sample = {name: best.config[name] for name in space.sampled_names()}
    print(f"best trial {Path(best.path).name}: {OBJECTIVE} {best.metrics_dataframe[OBJECTIVE].max():.4f} with {sample}")
    return search_dir


def _load_base_and_space(args: argparse.Namespace) -> tuple[dict[str, Any], SearchSpace]:
    """The base training config (YAML + overrides, ``--runs-dir``) and the search space, both validated."""
    base = load_config(args.config, [o for o in args.overrides if not o.startswith(OVERRIDE_PREFIX)])
    space = load_space(args.space, [o for o in args.overrides if o.startswith(OVERRIDE_PREFIX)], args.grid)
    document = to_dict(base) | ({"runs_dir": args.runs_dir} if args.runs_dir else {})
    check_against_config(space, document)
    return document, space


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="base training config (YAML, see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value for the training config, space.<key>=value for the space")
    parser.add_argument("--space", type=Path, help="search space YAML (keys: see tune/space.py)")
    parser.add_argument("--grid", choices=sorted(GRIDS), help="try every λ of a named grid (thesis: 0.001, 0.01, 0.1, 1)")
    parser.add_argument("--num-samples", type=int, default=8, help="trials (with a grid: samples per grid value)")
    parser.add_argument("--scheduler", choices=["asha", "fifo", "pbt"], default="asha",
                        help="asha stops trailing trials early; pbt lets trailing trials adopt leading ones' state")
    parser.add_argument("--perturbation-interval", type=int, default=1, help="PBT: epochs between exploit/explore steps")
    parser.add_argument("--quantile-fraction", type=float, default=0.25,
                        help="PBT: the bottom fraction adopts the state of the top fraction")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    parser.add_argument("--reduction-factor", type=float, default=3, help="ASHA: keep the best 1/factor at each rung")
    parser.add_argument("--search", choices=["random", "optuna"], default="random", help="optuna needs facemtl[tune]")
    parser.add_argument("--baselines", type=Path, help="YAML of single-task results (task: MAE or accuracy): "
                        "the objective becomes Δm, the mean %% improvement over them")
    parser.add_argument("--seed", type=int, help="seed of the sampler (default: the config's seed)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="trials at a time (0: as many as the CPUs fit)")
    parser.add_argument("--max-failures", type=int, default=2, help="failures a trial is retried after (from its last epoch)")
    parser.add_argument("--cluster", choices=["local", "slurm"], default="local",
                        help="local: this machine (or RAY_ADDRESS); slurm: a SLURM job through submitit (options below)")
    parser.add_argument("--name", default="search", help="the search folder is <runs-dir>/<name>")
    parser.add_argument("--runs-dir", help="default: the config's runs_dir")
    add_slurm_arguments(parser)
    return parser


def submit_to_slurm(args: argparse.Namespace, argv: list[str]) -> int:
    """Check everything a search would check, then submit it; with ``--wait``, follow it to its end."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    base_document, space = _load_base_and_space(args)
    check_search_options(args, space, load_config_dict(base_document).max_epochs)
    if args.baselines:
        load_baselines(args.baselines)
    options = slurm_options(args)
    search_dir = Path(base_document["runs_dir"]).resolve() / args.name
    # The job runs the same command as --cluster local, from the same working folder (sbatch's default).
    job = submit_search([*argv, "--cluster", "local", "--runs-dir", str(search_dir.parent)], search_dir, options)
    print(describe_submission(job, search_dir), flush=True)
    if not args.wait:
        return 0
    try:
        job.result()
    except (FailedJobError, UncompletedJobError) as error:
        print(f"SLURM job {job.job_id} failed ({job.state}):\n{error}", file=sys.stderr)
        return 1
    print(f"SLURM job {job.job_id} finished: results in {search_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        if args.cluster == "slurm":
            return submit_to_slurm(args, argv)
        search_dir = run_search(args)
    except (ConfigError, DataConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SearchFailed as error:
        print(f"search failed: {error}", file=sys.stderr)
        return 1
    print(f"\ndone in {time.perf_counter() - started:.0f} s. Results in {search_dir}:")
    print(f"  {TRIALS_FILE}, {BEST_CONFIG_FILE} (python -m pipeline.train --config {search_dir / BEST_CONFIG_FILE}), "
          f"one folder per trial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
