"""One trial of a search: the base config with the trial's values, trained by a TorchTrainer of its own.

Ray's documented pattern for Train V2 in Tune ("Hyperparameter Tuning with Ray Tune"): a function trainable
builds the TorchTrainer of ``pipeline.train``, whose ``TuneReportCallback`` hands Tune every epoch. The
trial's run is named by the trial (``<search>/<trial_id>/train``), so a trial that Tune restarts resumes its
run from the last epoch checkpoint. A trial that ASHA stops ends with its actor; Ray Train's
placement-group cleaner then frees its workers' CPUs.

Population-based training needs a Tune checkpoint at every exploit step, and TuneReportCallback passes a
Train checkpoint to Tune as a path only (a metric). With PBT a trial therefore trains in segments of
``--perturbation-interval`` epochs, one ``fit()`` each, and reports a segment's last epoch with its
checkpoint itself; a trial that PBT makes adopt another's state finds it in ``tune.get_checkpoint()``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.config import TrainConfig, load_config_dict, save_config, to_dict
from pipeline.provenance import record_start
from pipeline.run_records import (
    CONFIG_FILE, METRICS_FILE, PROGRESS_FILE, TENSORBOARD_DIR, latest_checkpoint, load_checkpoint, save_checkpoint,
)
from pipeline.train import build_trainer
from tune.objective import tune_result
from tune.results import trial_run_dir
from tune.space import apply_sample

RECORDS_KEPT_ON_ADOPTION = (TENSORBOARD_DIR, METRICS_FILE, CONFIG_FILE)


class EpochToTune(TuneReportCallback):
    """Ray's TuneReportCallback, with each epoch scored (objective, Δm) and the values it was trained with."""

    def __init__(self, baselines: dict[str, float] | None, sample: dict[str, Any]) -> None:
        super().__init__()
        self.baselines = baselines
        self.sample = dict(sample)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [tune_result(metrics[0], self.baselines, self.sample)], checkpoint)


def train_trial(sample: dict[str, Any], base_document: dict[str, Any], search_dir: str,
                baselines: dict[str, float] | None, max_failures: int, segment_epochs: int) -> None:
    """The function trainable: ``sample`` is Tune's config; ``segment_epochs`` > 0 trains in PBT segments."""
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(base_document, sample, Path(search_dir), trial_id)
    save_config(config, config.run_dir / CONFIG_FILE)
    record_start(config.run_dir, ["tune.search", "trial", trial_id])  # each start: a resumed search may run newer code
    known_epochs = 0  # epochs Tune has heard of already
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            donor = Path(checkpoint.path).parent.name
            if donor != trial_id:
                adopt_state(Path(folder), config, donor)
            known_epochs = json.loads((Path(folder) / PROGRESS_FILE).read_text())["epoch"]
    # A trial restarted after an interruption tells Tune its finished epochs again, then trains on.
    for epoch_metrics in finished_epochs(config.run_dir)[known_epochs:]:
        tune.report(tune_result(epoch_metrics, baselines, sample))
    if segment_epochs:
        train_in_segments(config, segment_epochs, max_failures, baselines, sample)
    else:
        build_trainer(config, max_failures, callbacks=[EpochToTune(baselines, sample)]).fit()


def trial_config(base_document: dict[str, Any], sample: dict[str, Any], search_dir: Path, trial_id: str) -> TrainConfig:
    """The base config with the trial's values; its run folder is ``<search>/<trial_id>/train``."""
    run_dir = trial_run_dir(search_dir, trial_id)
    run = {"runs_dir": str(run_dir.parent), "name": run_dir.name}
    return load_config_dict(apply_sample(base_document, sample) | run)


def finished_epochs(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics of every epoch the run's newest checkpoint holds."""
    found = latest_checkpoint(run_dir)
    return found[1]["run_state"]["history"] if found else []


def train_in_segments(config: TrainConfig, segment_epochs: int, max_failures: int,
                      baselines: dict[str, float] | None, sample: dict[str, Any]) -> None:
    """PBT: ``segment_epochs`` epochs per ``fit()``; each segment's epochs reported, the last with its checkpoint."""
    while True:
        done = len(finished_epochs(config.run_dir))
        if done >= config.max_epochs:
            return
        segment = dataclasses.replace(config, max_epochs=min(done + segment_epochs, config.max_epochs))
        build_trainer(segment, max_failures).fit()
        folder, payload = latest_checkpoint(config.run_dir)
        new_epochs = payload["run_state"]["history"][done:]
        if not new_epochs:  # every task frozen or stopped, or the run stopped on purpose
            return
        for epoch_metrics in new_epochs[:-1]:
            tune.report(tune_result(epoch_metrics, baselines, sample))
        tune.report(tune_result(new_epochs[-1], baselines, sample), checkpoint=tune.Checkpoint.from_directory(folder))


def adopt_state(folder: Path, config: TrainConfig, donor: str) -> None:
    """PBT's exploit: continue from another trial's epoch checkpoint with this trial's own hyperparameters.

    The state becomes this run's only checkpoint, under this trial's config, with the optimizer's learning
    rates set to this trial's (an adopted optimizer keeps the donor's) and Early Freeze's patience too; the
    run's best model goes with the superseded state.
    """
    payload = load_checkpoint(folder)
    set_learning_rates(payload["optimizer"], config)
    payload["freeze"]["patience"] = config.freeze.patience  # counters go on, against this patience
    payload["config"] = to_dict(config)  # the loop refuses to resume under a config whose maths differ
    # Ray Train's advice for a run that goes on from other state: a new run folder (its snapshot of the
    # run's checkpoints would name the superseded ones). Our records stay: TensorBoard, metrics, config.
    for path in config.run_dir.iterdir():
        if path.name not in RECORDS_KEPT_ON_ADOPTION:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    epoch = payload["run_state"]["epoch"]
    save_checkpoint(payload, config.run_dir / f"checkpoint_adopted_{epoch:06d}")
    print(f"trial {config.run_dir.parent.name} goes on from trial {donor}'s state after {epoch} epoch(s) with "
          f"lr {config.optim.lr:.3g}, λ {config.loss.lam:.3g}, patience {config.freeze.patience}", flush=True)


def set_learning_rates(optimizer_state: dict[str, Any], config: TrainConfig) -> None:
    """The learning rates ``build_optimizer`` gives ``config``, in a saved optimizer state (by group name)."""
    rates = {"net": config.optim.lr, "weighting": config.optim.weighting_lr or config.optim.lr}
    for group in optimizer_state["param_groups"]:
        group["lr"] = rates[group["name"]]
