"""Runs an experiment shares with another: an arm x seed whose config equals a finished run in a sibling experiment
folder (``runs_dir/<other experiment>/<run>/``) links its run folder to that run instead of training it again. While
an invocation trains a run it also claims the run's config (:func:`config_claim_path`), so that an arm of the same
config in another experiment is not trained a second time beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (
    RESUMABLE_KEYS, TrainConfig, config_differences, flatten_with_defaults, to_dict, unread_keys,
)
from pipeline.experiment_invocations import recorded_links
from pipeline.experiment_runs import read_rows, run_is_finished
from pipeline.run_claims import claim_holder
from pipeline.run_records import CONFIG_FILE

# What a resume may change but the results do not; unlike resuming, max_epochs counts: 10 epochs are not 12.
REUSE_IGNORED_KEYS = RESUMABLE_KEYS - {"max_epochs"}


def is_same_run(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the run saved with config ``saved`` is the run config ``wanted`` would train: equal in every key
    but ``name``, ``runs_dir`` and ``keep_checkpoints``."""
    return not config_differences(dict(saved), dict(wanted), ignore=REUSE_IGNORED_KEYS)


def read_saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The config.yaml of a run folder, or None where there is none to judge (absent, unreadable, not a mapping)."""
    try:
        saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def same_runs(wanted: Mapping[str, Any], saved_by_run: Mapping[Path, Mapping[str, Any]]) -> list[Path]:
    """The run folders of ``saved_by_run`` (run folder -> saved config) that are config ``wanted``'s run, by path."""
    return sorted(run_dir for run_dir, saved in saved_by_run.items() if is_same_run(saved, wanted))


def finished_same_runs(config: TrainConfig, saved_by_run: Mapping[Path, Mapping[str, Any]]) -> list[Path]:
    """:func:`same_runs` of ``config`` that have nothing left to train."""
    return [run_dir for run_dir in same_runs(to_dict(config), saved_by_run)
            if run_is_finished(read_rows(run_dir), config.max_epochs)]


def sibling_run_configs(experiment_dir: Path) -> dict[Path, dict[str, Any]]:
    """Real run folder -> saved config of every ``runs_dir/*/*/config.yaml`` outside ``experiment_dir``; a run
    another experiment links to counts once, as the folder it links to."""
    own = experiment_dir.resolve()
    configs: dict[Path, dict[str, Any]] = {}
    for config_path in sorted(experiment_dir.parent.glob(f"*/*/{CONFIG_FILE}")):
        run_dir = config_path.parent.resolve()
        if config_path.parent.parent.resolve() == own or run_dir.parent == own or run_dir in configs:
            continue
        saved = read_saved_config(run_dir)
        if saved is not None:
            configs[run_dir] = saved
    return configs


def reuse_line(run_name: str, links: Sequence[str]) -> str:
    """The line saying which finished run ``run_name`` reuses: the first of ``links``, sorted by path."""
    others = f"; also {', '.join(links[1:])}, the first by path is taken" if len(links) > 1 else ""
    return f"{run_name}: same config as {links[0]} (finished{others}): reused, not trained"


def link_reused_runs(configs: Sequence[TrainConfig], experiment_dir: Path, reuse: bool = True) -> dict[str, str]:
    """Link the run folder of each arm x seed (``configs``) that has none yet to a finished run of the same config
    in a sibling experiment folder, when ``reuse``. A link of an earlier invocation stays while it points to a
    finished run of the arm's config; otherwise (or without ``reuse``) it is removed, so that the arm trains in
    its own folder. Only links recorded in ``invocations.jsonl`` are this function's: other symlinks are left as
    they are. Returns run name -> link (relative to ``experiment_dir``) of every arm x seed that reuses a
    run now."""
    linked: dict[str, str] = {}
    unlinked: list[TrainConfig] = []
    ours = recorded_links(experiment_dir)  # a link the user made (e.g. to a scratch disk) is a run folder like any
    for config in configs:
        run_dir = config.run_dir
        if run_dir.is_symlink() and ours.get(run_dir.name) == os.readlink(run_dir):
            link = os.readlink(run_dir)
            saved = read_saved_config(run_dir)
            if reuse and saved is not None and finished_same_runs(config, {run_dir: saved}):
                linked[run_dir.name] = link
                print(f"{run_dir.name}: reuses {link} (finished), as linked before", flush=True)
                continue
            run_dir.unlink(missing_ok=True)  # only the link, not its run; missing: another invocation removed it
            why = "--no-reuse" if not reuse else "not a finished run of this config any more"
            print(f"{run_dir.name}: link to {link} removed ({why})", flush=True)
        if reuse and not run_dir.exists() and claim_holder(run_dir) is None:  # held: another invocation starts it
            unlinked.append(config)
    if not unlinked:
        return linked
    saved_by_run = sibling_run_configs(experiment_dir)
    for config in unlinked:
        matches = finished_same_runs(config, saved_by_run)
        if not matches:
            continue
        links = [os.path.relpath(run_dir, experiment_dir.resolve()) for run_dir in matches]
        try:
            config.run_dir.symlink_to(links[0], target_is_directory=True)
        except FileExistsError:  # another invocation of the experiment got there first (pipeline.run_claims)
            if not (config.run_dir.is_symlink() and os.readlink(config.run_dir) == links[0]):
                continue  # it started the arm in a folder of its own: that is the arm's run now
        linked[config.run_dir.name] = links[0]
        print(reuse_line(config.run_dir.name, links), flush=True)
    return linked


def config_key(config: TrainConfig) -> str:
    """A digest of what makes ``config``'s run that run (every key but :data:`REUSE_IGNORED_KEYS`, defaults filled
    in as :func:`is_same_run` compares them): equal for the arms of two experiments that are one run."""
    flat = flatten_with_defaults(to_dict(config))
    unread = unread_keys(flat, {flat.get("loss.weighting")})
    flat = {key: value for key, value in flat.items() if key not in REUSE_IGNORED_KEYS | unread}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:20]


def config_claim_path(experiment_dir: Path, config: TrainConfig) -> Path:
    """What an invocation claims (:func:`pipeline.run_claims.claimed`) while it trains ``config``'s run, whichever
    experiment folder the run is in: one per config under the experiments' common ``runs_dir``, so that two
    experiments sharing a run (``freeze`` and ``lambda`` started together) do not both train it."""
    return experiment_dir.parent / ".config-claims" / config_key(config)


def sibling_in_training(config: TrainConfig, experiment_dir: Path,
                        saved_by_run: Mapping[Path, Mapping[str, Any]]) -> tuple[Path | None, dict[str, object]] | None:
    """Where ``config``'s run is in training now by another invocation, from its config claim: (the first unfinished
    run of the same config in a sibling experiment, or None where its folder says nothing yet; the claim's holder),
    or None where no one trains it."""
    holder = claim_holder(config_claim_path(experiment_dir, config))
    if holder is None:
        return None
    unfinished = [run_dir for run_dir in same_runs(to_dict(config), saved_by_run)
                  if not run_is_finished(read_rows(run_dir), config.max_epochs)]
    return (unfinished[0] if unfinished else None), holder
