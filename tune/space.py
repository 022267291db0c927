"""The search space of ``tune.search``: which training knobs a search samples, over which ranges.

    lr:        [1.0e-5, 1.0e-2]   # optim.lr, log-uniform [low, high)
    lam:       [1.0e-3, 1.0]      # loss.lam (λ of the learned weighting), log-uniform [low, high)
    lam_grid:  []                 # non-empty: every λ in the list is tried instead (grid search)
    patience:  [2, 10]            # freeze.patience (Early Freeze), integer, both ends included
    weighting: null               # a list such as [learned, equal] makes loss.weighting a choice

A space comes from these defaults, an optional YAML file (``--space FILE``) and ``space.<key>=value``
overrides, in that order; ``--grid thesis`` sets ``lam_grid`` to the thesis' λ values. Everything here is
pure: a bad space is refused with the key and what was expected before Ray starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.config import ConfigError, apply_override, build_dataclass, load_config_dict

THESIS_LAM_GRID = [0.001, 0.01, 0.1, 1.0]  # the λ values the thesis compared
GRIDS = {"thesis": THESIS_LAM_GRID}
OVERRIDE_PREFIX = "space."


@dataclass
class SearchSpace:
    lr: tuple[float, float] = (1e-5, 1e-2)
    lam: tuple[float, float] = (1e-3, 1.0)
    lam_grid: list[float] = field(default_factory=list)
    patience: tuple[int, int] = (2, 10)
    weighting: list[str] | None = None

    def sampled_names(self) -> list[str]:
        """The hyperparameters a trial samples, in column order."""
        return ["lr", "lam", "patience"] + (["weighting"] if self.weighting is not None else [])


# Where each sampled hyperparameter goes in the training config (pipeline/config.py).
CONFIG_KEYS = {"lr": "optim.lr", "lam": "loss.lam", "patience": "freeze.patience", "weighting": "loss.weighting"}


def load_space(path: Path | None = None, overrides: Sequence[str] = (), grid: str | None = None) -> SearchSpace:
    """Defaults, then the YAML file, then ``space.<key>=value`` overrides, then a named λ grid; validated."""
    document: dict[str, Any] = {}
    if path is not None:
        document = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: expected a mapping of search-space keys, got {document!r}")
    for override in overrides:
        if not override.startswith(OVERRIDE_PREFIX):
            raise ConfigError(f"search-space override {override!r} must start with {OVERRIDE_PREFIX!r}")
        apply_override(document, override[len(OVERRIDE_PREFIX):])
    if grid is not None:
        if grid not in GRIDS:
            raise ConfigError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
        document["lam_grid"] = GRIDS[grid]
    space = build_dataclass(SearchSpace, document, OVERRIDE_PREFIX)
    validate_space(space)
    return space


def validate_space(space: SearchSpace) -> None:
    """Ranges that can be sampled: positive log ranges, low < high, non-empty lists; errors name the key."""
    for name in ("lr", "lam"):
        low, high = getattr(space, name)
        if low <= 0:
            raise ConfigError(f"space.{name}: a log-uniform range needs low > 0, got [{low:g}, {high:g}]")
        if low >= high:
            raise ConfigError(f"space.{name}: empty or inverted range [{low:g}, {high:g}]; expected low < high")
    if any(value < 0 for value in space.lam_grid):
        raise ConfigError(f"space.lam_grid: λ must be >= 0, got {space.lam_grid}")
    low, high = space.patience
    if low < 1 or low > high:
        raise ConfigError(f"space.patience: expected 1 <= low <= high, got [{low}, {high}]")
    if space.weighting is not None and not space.weighting:
        raise ConfigError("space.weighting: the choice list is empty; "
                          "leave it out (null) to keep the config's weighting")


def apply_sample(base_document: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """A copy of a training-config document with the sampled hyperparameters set at their config keys."""
    document = copy.deepcopy(base_document)
    for name, value in sample.items():
        *sections, key = CONFIG_KEYS[name].split(".")
        node = document
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return document


def check_against_config(space: SearchSpace, base_document: dict[str, Any]) -> None:
    """Every end of every range, and every choice, makes a valid training config (e.g. patience >= 1)."""
    values = {
        "lr": list(space.lr),
        "lam": space.lam_grid or list(space.lam),
        "patience": list(space.patience),
        "weighting": space.weighting or [],
    }
    for name, options in values.items():
        for value in options:
            try:
                load_config_dict(apply_sample(base_document, {name: value}))
            except ConfigError as error:
                raise ConfigError(f"space.{name}: value {value!r} does not make a valid config: {error}") from None
