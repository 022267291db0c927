"""Run configuration: dataclasses loaded from YAML, with ``key=value`` overrides from the command line.

Every knob is declared (and documented) here once. Unknown keys are errors that name the key and the
keys that exist; the resolved config is printed at start and saved into the run folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.losses import WEIGHTINGS
from pipeline.schema import TaskDeclarationError, TaskSpec, known_tasks, load_tasks_file, parse_task_declarations


@dataclass
class AugmentConfig:
    enabled: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)  # random-resized-crop area range; small: faces are aligned
    hflip: bool = True
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 turns it off


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=list)  # shard folders written by pipeline.shard
    tasks: list[str] = field(default_factory=list)  # tasks to learn; empty = every task a dataset labels
    # YAML task declarations beside the built-in tasks (docs/tasks.md); the shards' own declarations are read too
    tasks_file: str | None = None
    task_shares: dict[str, float] = field(default_factory=dict)  # target share of labelled examples; default equal
    batch_size: int = 64  # per worker (rank)
    image_size: int = 64  # side of the network input; shards are resized on the fly when they differ
    loader_workers: int = 2  # dataloader processes per rank
    shuffle_buffer: int = 500  # samples kept per dataset stream for shuffling
    steps_per_epoch: int = 0  # 0 = train samples / global batch size
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any torchvision classification model name
    shared_dims: list[int] = field(default_factory=lambda: [256])
    head_hidden: int = 128
    dropout: float = 0.3
    weights_path: str | None = None  # local backbone weights (torchvision state dict); never downloaded
    # a facemtl run folder (its best_model.pt) or checkpoint file: backbone, shared layers and the heads of
    # tasks with the same output shape start from it (pretrain, then fine-tune); other heads start fresh
    init_from: str | None = None
    binary_outputs: int = 2  # 2 = two-way cross-entropy, 1 = BCE logit
    # NHWC model and batches on every device: tensor cores on GPUs, oneDNN's NHWC kernels on CPUs
    # (bench/channels_last.py, 2 cores: MobileNetV2 1.31x, ResNet-18 1.09x the NCHW training step)
    channels_last: bool = True


@dataclass
class LossConfig:
    weighting: str = "learned"  # a name registered in pipeline/losses.py (README: Loss weightings)
    lam: float = 0.1  # λ of the learned weighting's regulariser (thesis Table 3.2)
    fixed_weights: dict[str, float] = field(default_factory=dict)  # for weighting=fixed; one-hot = single task
    dwa_temperature: float = 2.0  # T of DWA's softmax over epoch loss ratios (Liu et al. 2019)
    famo_lr: float = 0.025  # Adam lr of FAMO's task logits (its authors' default)
    # γ, FAMO's decay on its logits: its authors' class default and Cityscapes setting; their CelebA and NYUv2
    # runs (and LibMTL) use 0.001, which lets the logits drift further from equal
    famo_weight_decay: float = 0.01
    gradnorm_alpha: float = 1.5  # α of GradNorm, the restoring force towards equal training rates (Chen et al. 2018)
    dbmtl_beta: float = 0.9  # β of DB-MTL's moving average of task gradients (Lin et al. 2023)
    # σ > 0 decays the average's β as β / step^σ; its authors' code (LibMTL's DB_beta_sigma) keeps it constant
    dbmtl_beta_sigma: float = 0.0
    age_scale: float = 100.0  # age target and prediction are divided by this (thesis 3.3.2)
    regression_loss: str = "mse"  # mse | l1


@dataclass
class OptimConfig:
    lr: float = 3e-5  # thesis Table 3.2 (pretrained backbones); from scratch wants ~1e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    # Learning rate of the loss-weight parameters (0 = same as lr). The thesis trained them at its 3e-5;
    # at a network lr of 1e-3 they ran to the smallest loss within 4 epochs on UTKFace (docs/results.md).
    weighting_lr: float = 3e-5
    plateau_patience: int = 2  # epochs without total-val-loss improvement before lr ÷ 10
    plateau_factor: float = 0.1


@dataclass
class FreezeConfig:
    mode: str = "early-freeze"  # early-freeze | early-stop | none
    patience: int = 3
    min_delta: float = 0.0
    # consecutive: validations without improvement since the last one (the thesis' prose); cumulative: every
    # validation without improvement (its Algorithm 1 never resets the counter)
    counter: str = "consecutive"
    # early-freeze only, not in the thesis: the trunk freezes once this many tasks are out of patience together,
    # at the latest of their best epochs (1 = Algorithm 1: the first task out of patience). With tens of tasks,
    # about a quarter of them keeps one early-stalling task from resetting the trunk for all (docs/tasks.md).
    trunk_quorum: int = 1


@dataclass
class TrainConfig:
    name: str = "run"
    runs_dir: str = "runs"  # the run folder is runs_dir/name
    max_epochs: int = 20
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    keep_checkpoints: int = 2  # epoch checkpoints kept, newest first (best_model.pt is always kept); 0 = all
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


class ConfigError(ValueError):
    """A config file or override that does not fit the declared configuration."""


def build_dataclass(cls: type, values: dict[str, Any], path: str) -> Any:
    """Construct dataclass ``cls`` from a mapping, recursing into nested dataclasses; unknown keys fail."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{path}{k}' for k in unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value or {}, f"{path}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ConfigError(f"{path}: expected a list of {len(typing.get_args(hint))} values, got {value!r}")
        return tuple(_coerce(a, v, path) for a, v in zip(typing.get_args(hint), value))
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, path) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(item, v, path) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint in (int, float, str):
        try:
            coerced = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return coerced
    return value


def apply_override(document: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested mapping in place."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not key=value")
    parts = key.strip().split(".")
    node = document
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {yaml_problem(error)}") from None


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line and column, counted from 1)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or error}{where}"


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults), apply overrides, validate, and return the dataclass tree."""
    document: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {yaml_problem(error)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        document = loaded or {}
    for override in overrides:
        apply_override(document, override)
    return load_config_dict(document)


def load_config_dict(document: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from a plain mapping (e.g. one that travelled to a Ray worker)."""
    config = build_dataclass(TrainConfig, document, "")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks that do not need the data: ranges and choices, each naming the key."""
    checks = [
        (config.max_epochs >= 1, "max_epochs must be >= 1"),
        (config.data.batch_size >= 2, "data.batch_size must be >= 2 (BatchNorm in the shared layers)"),
        (config.optim.lr > 0, f"optim.lr must be > 0, got {config.optim.lr}"),
        (config.loss.lam >= 0, f"loss.lam must be >= 0, got {config.loss.lam}"),
        (config.freeze.patience >= 1, "freeze.patience must be >= 1"),
        (config.freeze.trunk_quorum >= 1, f"freeze.trunk_quorum must be >= 1, got {config.freeze.trunk_quorum}"),
        (not config.data.tasks or config.freeze.trunk_quorum <= len(config.data.tasks),
         f"freeze.trunk_quorum {config.freeze.trunk_quorum} is more than the {len(config.data.tasks)} tasks in "
         "data.tasks"),
        (config.freeze.mode in ("early-freeze", "early-stop", "none"), f"freeze.mode {config.freeze.mode!r} unknown"),
        (config.freeze.counter in ("consecutive", "cumulative"),
         f"freeze.counter must be consecutive or cumulative, got {config.freeze.counter!r}"),
        (config.loss.weighting in WEIGHTINGS,
         f"loss.weighting {config.loss.weighting!r} unknown; known: {', '.join(WEIGHTINGS)}"),
        (not (getattr(WEIGHTINGS.get(config.loss.weighting), "gradient_level", False) and config.precision == "fp16"),
         f"loss.weighting={config.loss.weighting} combines per-task gradients and does not support precision=fp16; "
         "use bf16 or fp32"),
        (config.loss.gradnorm_alpha >= 0, f"loss.gradnorm_alpha must be >= 0, got {config.loss.gradnorm_alpha}"),
        (0 <= config.loss.dbmtl_beta < 1 and config.loss.dbmtl_beta_sigma >= 0,
         "loss.dbmtl_beta must be in [0, 1) and loss.dbmtl_beta_sigma >= 0"),
        (config.loss.regression_loss in ("mse", "l1"), "loss.regression_loss must be mse or l1"),
        (config.precision in ("auto", "fp32", "bf16", "fp16"), f"precision {config.precision!r} unknown"),
        (config.num_workers >= 1, "num_workers must be >= 1"),
        (config.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0 (0 keeps all), got {config.keep_checkpoints}"),
        (config.optim.weighting_lr >= 0,
         f"optim.weighting_lr must be >= 0 (0 = optim.lr), got {config.optim.weighting_lr}"),
        (0 < config.data.augment.crop_scale[0] <= config.data.augment.crop_scale[1] <= 1,
         "data.augment.crop_scale must be 0 < low <= high <= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    declared, unreadable = declared_tasks_of(config.data)
    known = {**known_tasks(), **{spec.name: spec for spec in declared}}
    unknown = [task for task in config.data.tasks if task not in known]
    if unknown and not unreadable:  # else training checks them once the shards are there (pipeline.training_setup)
        raise ConfigError(f"data.tasks names unknown task(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
                          " (declare more in data.tasks_file: docs/tasks.md)")


def declared_tasks_of(data: DataConfig) -> tuple[list[TaskSpec], list[str]]:
    """Tasks declared by ``data.tasks_file`` and by the datasets' summaries, and the sources that could not be
    read (a file or folder absent here: a config loaded from a checkpoint on another machine)."""
    declared: list[TaskSpec] = []
    unreadable: list[str] = []
    if data.tasks_file:
        try:
            declared += load_tasks_file(data.tasks_file)
        except TaskDeclarationError as error:
            if Path(data.tasks_file).exists():
                raise ConfigError(f"data.tasks_file: {error}") from None
            unreadable.append(data.tasks_file)
    for folder in data.datasets:
        summary_path = Path(folder) / "summary.json"
        try:
            declarations = json.loads(summary_path.read_text()).get("task_declarations", [])
            declared += parse_task_declarations(declarations, str(summary_path))
        except (OSError, ValueError, AttributeError):
            unreadable.append(str(summary_path))  # pipeline.data reports what is wrong with a folder
    return declared, unreadable


def to_dict(config: Any) -> dict[str, Any]:
    """Plain types, ready for YAML/JSON (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(config))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Keys a resumed run may change: they say how long to run and where, not what is computed.
RESUMABLE_KEYS = frozenset({"max_epochs", "keep_checkpoints", "name", "runs_dir"})

# The loss keys one weighting alone reads (pipeline.loop.weighting_options): under another weighting they change
# nothing, so a run is the same run whatever they hold (a default changed later does not orphan finished runs).
WEIGHTING_ONLY_KEYS = {
    "learned": ("loss.lam",), "fixed": ("loss.fixed_weights",), "dwa": ("loss.dwa_temperature",),
    "famo": ("loss.famo_lr", "loss.famo_weight_decay"), "gradnorm": ("loss.gradnorm_alpha",),
    "dbmtl": ("loss.dbmtl_beta", "loss.dbmtl_beta_sigma"),
}


def unread_keys(keys: typing.Iterable[str], weightings: typing.Collection[str | None]) -> set[str]:
    """Those of the flattened ``keys`` that belong to a weighting not in ``weightings``
    (:data:`WEIGHTING_ONLY_KEYS`)."""
    owned = [prefix for owner, prefixes in WEIGHTING_ONLY_KEYS.items() if owner not in weightings
             for prefix in prefixes]
    return {key for key in keys if any(key == prefix or key.startswith(f"{prefix}.") for prefix in owned)}


def flatten(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], wanted: dict[str, Any],
                       ignore: frozenset[str] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys outside ``ignore`` whose values differ between two config mappings: a run resumed under
    such a config would no longer be the run it continues. A key that neither config's weighting reads is no
    difference (:data:`WEIGHTING_ONLY_KEYS`)."""
    before, after = flatten_with_defaults(saved), flatten_with_defaults(wanted)
    keys = set(before) | set(after)
    unread = unread_keys(keys, {before.get("loss.weighting"), after.get("loss.weighting")})
    return [key for key in sorted(keys)
            if key not in ignore and key not in unread and before.get(key) != after.get(key)]


def flatten_with_defaults(document: dict[str, Any]) -> dict[str, Any]:
    """:func:`flatten`, a key the document lacks (saved before the key existed) holding its default, which
    keeps the behaviour from before the key was added."""
    return flattened_defaults() | flatten(document)


@functools.cache
def flattened_defaults() -> dict[str, Any]:
    """The defaults, flattened once: to_dict takes milliseconds and a reuse search compares dozens of configs.
    Callers copy it (``|``), never change it."""
    return flatten(to_dict(TrainConfig()))


def describe_differences(saved: dict[str, Any], wanted: dict[str, Any], keys: typing.Iterable[str]) -> str:
    """``key saved -> wanted`` for each key, comma-separated."""
    before, after = flatten_with_defaults(saved), flatten_with_defaults(wanted)
    return ", ".join(f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in keys)


def save_config(config: TrainConfig, path: Path) -> None:
    """Written whole or not at all: another invocation of an experiment may be reading it (pipeline.run_claims)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    os.replace(temporary, path)


def with_absolute_paths(config: TrainConfig, base: Path | None = None) -> TrainConfig:
    """Paths resolved against ``base`` (the launching directory): Ray workers run in folders of their own."""
    base = base or Path.cwd()

    def absolute(path: str) -> str:
        return str((base / path).resolve()) if not Path(path).is_absolute() else path

    data = dataclasses.replace(config.data, datasets=[absolute(p) for p in config.data.datasets],
                               tasks_file=absolute(config.data.tasks_file) if config.data.tasks_file else None)
    model = dataclasses.replace(config.model,
                                weights_path=absolute(config.model.weights_path) if config.model.weights_path else None,
                                init_from=absolute(config.model.init_from) if config.model.init_from else None)
    return dataclasses.replace(config, runs_dir=absolute(config.runs_dir), data=data, model=model)
