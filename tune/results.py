"""A search folder's files and the tables written into it when the search ends. No Ray here: the report
(``tune.report``) reads what this module names.

    <search>/config.yaml, space.yaml, baselines.yaml   the base training config, the space, the baselines
    <search>/<trial_id>/train/                         one trial's training run (``TRIAL_RUN_NAME``)
    <search>/trial_results.jsonl                       each epoch of each trial, as Tune heard it
    <search>/trials.parquet                            one row per trial and epoch (latest report wins)
    <search>/best_config.yaml                          the best trial's config, for ``pipeline.train``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import load_config_dict, to_dict
from tune.objective import DELTA_M, HPARAM_PREFIX, MEAN_SCORE, OBJECTIVE
from tune.space import apply_sample

TRIAL_RUN_NAME = "train"
TRIALS_FILE = "trials.parquet"
TRIAL_RESULTS_FILE = "trial_results.jsonl"
BEST_CONFIG_FILE = "best_config.yaml"
SPACE_FILE = "space.yaml"
BASELINES_FILE = "baselines.yaml"


def trial_run_dir(search_dir: Path, trial_id: str) -> Path:
    """Where a trial's training run lives: in the search folder itself, next to Tune's records of it."""
    return Path(search_dir) / trial_id / TRIAL_RUN_NAME


def trial_row(trial_id: str, result: dict[str, Any], sampled_names: list[str]) -> dict[str, Any]:
    """One epoch of a trial as ``trials.parquet`` holds it: the values it was trained with (PBT changes them
    during a trial), the objective and the validation metrics."""
    sample = {name: result[f"{HPARAM_PREFIX}{name}"] for name in sampled_names}
    measured = {key: value for key, value in result.items()
                if key.startswith(("val/", "weights/")) or key in (MEAN_SCORE, DELTA_M)}
    return {"trial_id": trial_id, "epoch": int(result["epoch"]), **sample, OBJECTIVE: result[OBJECTIVE], **measured}


def append_trial_row(search_dir: Path, row: dict[str, Any]) -> None:
    """Add one epoch to ``trial_results.jsonl``, written by the driver as Tune hears each result.

    Tune's own per-trial logs (progress.csv, result.json) are not used for the tables: when a trial restarts
    within a search (a PBT exploit, a worker failure), Tune copies them back from the storage folder over the
    fresher local copy and drops the results reported since the last sync (ray-project/ray#41668).
    """
    with (Path(search_dir) / TRIAL_RESULTS_FILE).open("a") as handle:
        handle.write(json.dumps(row, default=plain_number) + "\n")
        handle.flush()


def plain_number(value: Any) -> Any:
    """NumPy scalars (Tune samples some values as such) as the Python numbers JSON knows."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a number for trial_results.jsonl")


def trials_table(search_dir: Path) -> pa.Table:
    """One row per trial and epoch, from ``trial_results.jsonl``. A trial resumed after an interruption
    reports its last epochs again: the latest report wins. A line cut short by a killed driver is skipped."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    path = Path(search_dir) / TRIAL_RESULTS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        rows[row["trial_id"], row["epoch"]] = row
    return pa.Table.from_pylist([rows[key] for key in sorted(rows)])


def best_trial_config(trials: pa.Table, base_document: dict[str, Any], name: str,
                      sampled_names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base config with the values of the best epoch of any trial (highest objective), run
    ``<name>-best``, and that epoch's row. With PBT the values are those the epoch was trained with."""
    best = max(trials.to_pylist(), key=lambda row: row[OBJECTIVE])
    document = apply_sample(base_document, {name: best[name] for name in sampled_names}) | {"name": f"{name}-best"}
    return to_dict(load_config_dict(document)), best
