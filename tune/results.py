"""A search folder's files and the tables written into it when the search ends. No Ray here: the report
(``tune.report``) reads what this module names.

    <search>/config.yaml, space.yaml, baselines.yaml   the base training config, the space, the baselines
    <search>/<trial_id>/train/                         one trial's training run (``TRIAL_RUN_NAME``)
    <search>/trials.parquet                            one row per trial and epoch
    <search>/best_config.yaml                          the best trial's config, for ``pipeline.train``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from pipeline.config import load_config_dict, to_dict
from tune.objective import DELTA_M, HPARAM_PREFIX, MEAN_SCORE, OBJECTIVE
from tune.space import apply_sample

TRIAL_RUN_NAME = "train"
TRIALS_FILE = "trials.parquet"
BEST_CONFIG_FILE = "best_config.yaml"
SPACE_FILE = "space.yaml"
BASELINES_FILE = "baselines.yaml"


def trial_run_dir(search_dir: Path, trial_id: str) -> Path:
    """Where a trial's training run lives: in the search folder itself, next to Tune's records of it."""
    return Path(search_dir) / trial_id / TRIAL_RUN_NAME


def trials_table(results: Iterable[Any], sampled_names: list[str]) -> pa.Table:
    """One row per trial and epoch: trial_id, epoch, sampled hyperparameters, objective, val metrics.

    ``results`` are Tune's (``ResultGrid``). A trial resumed after an interruption reports its last epochs
    again; the latest report wins.
    """
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for result in results:
        if result.metrics_dataframe is None:
            continue
        trial_id = Path(result.path).name  # the trial's folder, named by its trial id
        final_sample = {name: result.config[name] for name in sampled_names}
        for report in result.metrics_dataframe.to_dict("records"):
            # The values the epoch was trained with: PBT changes them during a trial.
            sample = {name: report.get(f"{HPARAM_PREFIX}{name}", value) for name, value in final_sample.items()}
            measured = {key: value for key, value in report.items()
                        if key.startswith(("val/", "weights/")) or key in (MEAN_SCORE, DELTA_M)}
            epoch = int(report["epoch"])
            rows[trial_id, epoch] = {"trial_id": trial_id, "epoch": epoch, **sample, OBJECTIVE: report[OBJECTIVE],
                                     **measured}
    return pa.Table.from_pylist([rows[key] for key in sorted(rows)])


def best_trial_config(results: Any, base_document: dict[str, Any], name: str) -> tuple[dict[str, Any], Any]:
    """The base config with the best trial's values (highest objective at any epoch), run ``<name>-best``."""
    best = results.get_best_result(metric=OBJECTIVE, mode="max", scope="all")
    document = apply_sample(base_document, best.config) | {"name": f"{name}-best"}
    return to_dict(load_config_dict(document)), best
