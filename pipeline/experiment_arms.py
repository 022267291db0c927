"""The arms of each experiment of :mod:`pipeline.experiments`: one config's variants, as ``key=value`` overrides.

Pure: from the config's tasks, the datasets labelling each and the command's choices to the arms in table
order, each marked baseline or not; nothing here reads a file or trains.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.config import TrainConfig
from pipeline.freeze import MODES as FREEZE_MODES
from pipeline.losses import WEIGHTINGS
from pipeline.run_records import BEST_MODEL_FILE

EXPERIMENTS = ("mtl-vs-single", "weighting", "freeze", "lambda", "transfer")
# Every registered strategy but the hand-set one, equal (the thesis' "average loss", the baseline) first.
COMPARED_WEIGHTINGS = ("equal", *(name for name in WEIGHTINGS if name not in ("equal", "fixed")))
LAMBDA_GRID = (0.001, 0.01, 0.1, 1.0)  # thesis Table 5.5
BASELINE_LAMBDA = 0.1  # the config default and the thesis' best λ
TRUNK_QUORUM = 2  # the freeze experiment's quorum arm, for configs of at least that many tasks
# Weightings whose authors learn the loss weights with the network's optimizer (Kendall et al.'s log-variances,
# GradNorm's w): at the configs' optim.weighting_lr, the thesis' 3e-5 for its own layer, they would hardly move
# in a short run and train as `equal` does. Their arms take the network's lr (0 = optim.lr).
AT_NETWORK_LR = ("uncertainty", "gradnorm")


class ExperimentError(Exception):
    """An experiment that cannot go on; the message names the run folder and what to do."""


@dataclass(frozen=True)
class Arm:
    """One configuration of an experiment: ``overrides`` are applied after the user's, per seed."""

    name: str  # run folders are <name>-seed<k>
    row: str  # the table row its results go to (the single-task arms share one)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    baseline: bool = False  # its row is the one every other row's Δm is measured against


def single_task_overrides(task: str, datasets: Sequence[str]) -> dict[str, Any]:
    """The config changes that turn the multi-task config into ``task``'s single-task baseline."""
    return {"data.tasks": [task], "data.datasets": list(datasets), "data.task_shares": {},
            "loss.weighting": "fixed", "loss.fixed_weights": {task: 1.0}}


def source_name(init_from: Path) -> str:
    """How the table names a pretrained network: its run folder (``runs/x/mtl-seed0/best_model.pt``: mtl-seed0),
    with the file when it is another checkpoint (``checkpoint_000003/checkpoint.pt``)."""
    if init_from.name == BEST_MODEL_FILE:
        return init_from.parent.name
    return f"{init_from.parent.name}/{init_from.name}" if init_from.suffix == ".pt" else init_from.name


def transfer_arms(init_from: Path, backbone_weights: str | None) -> list[Arm]:
    """The config's own start (the baseline) and the same config started from ``init_from``'s network. The
    own start clears ``model.init_from``, so that the two arms differ in that key alone."""
    own_start = ("imagenet", "ImageNet start") if backbone_weights else ("scratch", "random start")
    return [Arm(*own_start, {"model.init_from": None}, baseline=True),
            Arm("pretrained", f"from {source_name(init_from)}", {"model.init_from": str(init_from)})]


def experiment_arms(experiment: str, tasks: Sequence[str], datasets_by_task: Mapping[str, Sequence[str]],
                    single_tasks: Sequence[str] = (), weightings: Sequence[str] = (), init_from: Path | None = None,
                    backbone_weights: str | None = None) -> list[Arm]:
    """The arms of ``experiment`` in table order; ``datasets_by_task`` (shard folders labelling each task) and
    ``single_tasks`` (the tasks that get a single-task arm; default all) are only used by ``mtl-vs-single``,
    ``weightings`` (default every registered one but ``fixed``; ``equal``, the baseline, always) by ``weighting``,
    ``init_from`` (required there, refused elsewhere) and ``backbone_weights`` (the config's
    ``model.weights_path``) by ``transfer``."""
    if experiment == "transfer" and init_from is None:
        raise ExperimentError("transfer needs --init-from: the pretrained run folder (or its best_model.pt)")
    for option, value, owner in (("--init-from", init_from, "transfer"),
                                 ("--single-tasks", single_tasks, "mtl-vs-single"),
                                 ("--weightings", weightings, "weighting")):
        if value and experiment != owner:
            raise ExperimentError(f"{option} is for the {owner} experiment; {experiment} does not take it")
    if experiment == "mtl-vs-single":
        unknown = [task for task in single_tasks if task not in tasks]
        if unknown:
            raise ExperimentError(f"--single-tasks names {', '.join(unknown)}, not among the config's tasks "
                                  f"({', '.join(tasks)})")
        chosen = [task for task in tasks if task in single_tasks] if single_tasks else list(tasks)
        singles = [Arm(f"single-{task}", "single-task", single_task_overrides(task, datasets_by_task[task]),
                       baseline=True) for task in chosen]
        return [*singles, Arm("mtl", "MTL")]
    if experiment == "weighting":
        unknown = [name for name in weightings if name not in COMPARED_WEIGHTINGS]
        if unknown:
            raise ExperimentError(f"--weightings names {', '.join(unknown)}; known: {', '.join(COMPARED_WEIGHTINGS)}")
        chosen = [name for name in COMPARED_WEIGHTINGS if name == "equal" or name in weightings or not weightings]
        return [Arm(weighting, weighting, {"loss.weighting": weighting,
                                           **({"optim.weighting_lr": 0.0} if weighting in AT_NETWORK_LR else {})},
                    baseline=weighting == "equal") for weighting in chosen]
    if experiment == "freeze":
        # Algorithm 1 resets the whole trunk to the first stalled task's best epoch; the quorum arm (ours, not the
        # thesis') asks whether waiting for a second task keeps what the trunk learned for the others.
        quorum = [Arm(f"early-freeze-quorum{TRUNK_QUORUM}", f"early-freeze (trunk quorum {TRUNK_QUORUM})",
                      {"freeze.mode": "early-freeze", "freeze.trunk_quorum": TRUNK_QUORUM})]
        return [*(Arm(mode, mode, {"freeze.mode": mode}, baseline=mode == "early-stop") for mode in FREEZE_MODES),
                Arm("early-freeze-cumulative", "early-freeze (cumulative counter)",
                    {"freeze.mode": "early-freeze", "freeze.counter": "cumulative"}),
                *(quorum if len(tasks) >= TRUNK_QUORUM else [])]
    if experiment == "lambda":
        return [Arm(f"lambda-{lam:g}", f"λ={lam:g}", {"loss.weighting": "learned", "loss.lam": lam},
                    baseline=lam == BASELINE_LAMBDA) for lam in LAMBDA_GRID]
    if experiment == "transfer":
        return transfer_arms(init_from, backbone_weights)
    raise ValueError(f"unknown experiment {experiment!r}; known: {', '.join(EXPERIMENTS)}")


def chosen_arms(experiment: str, arms: Sequence[Arm], names: Sequence[str] = (), baseline: str | None = None
                ) -> list[Arm]:
    """``arms`` restricted to those ``names`` lists (``--arms``; default every arm) and the baseline, which always
    runs; ``baseline`` (``--baseline``) names the arm every row is measured against, in place of the experiment's
    own (``freeze --arms none --baseline early-freeze``: Algorithm 1 against no freezing, two arms)."""
    known = [arm.name for arm in arms]
    unknown = [name for name in (*names, *([baseline] if baseline else [])) if name not in known]
    if unknown:
        raise ExperimentError(f"{experiment} has no arm {', '.join(unknown)}; its arms: {', '.join(known)}")
    if baseline:
        arms = [replace(arm, baseline=arm.name == baseline) for arm in arms]
    return [arm for arm in arms if arm.baseline or not names or arm.name in names]


def selection_name(arms: Sequence[Arm], chosen: Sequence[Arm]) -> str:
    """'' where ``chosen`` (:func:`chosen_arms`) is every arm of ``arms`` against the experiment's own baseline,
    else a folder name for the selection, e.g. ``none-vs-early-freeze``: its table is kept apart from the full one."""
    if [(arm.name, arm.baseline) for arm in chosen] == [(arm.name, arm.baseline) for arm in arms]:
        return ""
    against = "+".join(arm.name for arm in chosen if arm.baseline)
    if {arm.name for arm in chosen} == {arm.name for arm in arms}:
        return f"vs-{against}"
    others = [arm.name for arm in chosen if not arm.baseline]
    return f"{'+'.join(others)}-vs-{against}" if others else against


def baseline_row(arms: Sequence[Arm]) -> str:
    """The row every other row's Δm is measured against: the one row of the arms marked ``baseline``."""
    (row,) = {arm.row for arm in arms if arm.baseline}
    return row


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}-seed{seed}"


def arm_name_of(run: str) -> str:
    """The arm a run folder name (:func:`run_name`) is a seed of."""
    return re.sub(r"-seed\d+$", "", run)


def arm_overrides(arm: Arm, seed: int, experiment_dir: Path) -> list[str]:
    """``key=value`` overrides of one run; values as JSON, which the config's YAML parser reads exactly."""
    values = {**arm.overrides, "seed": seed, "runs_dir": str(experiment_dir), "name": run_name(arm, seed)}
    return [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in values.items()]


def check_transfer_source(source_config: Mapping[str, Any] | None, config: TrainConfig) -> None:
    """A source of another backbone would hand over nothing of the trunk: that is no transfer, so refused."""
    backbone = ((source_config or {}).get("model") or {}).get("backbone")
    if backbone != config.model.backbone:
        raise ExperimentError(f"--init-from holds a {backbone} network and the config trains {config.model.backbone}: "
                              "model.init_from would load no trunk; fine-tune with the source's model.backbone")
