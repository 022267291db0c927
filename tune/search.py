"""``python -m tune.search``: Ray Tune over lr, λ and Early-Freeze patience; every trial a Ray Train run.

    python -m tune.search --config configs/demo.yaml --num-samples 8                  # ASHA, random search
    python -m tune.search --config configs/demo.yaml --grid thesis --scheduler fifo    # λ ∈ {0.001, 0.01, 0.1, 1}
    python -m tune.search --config configs/demo.yaml max_epochs=10 space.lr=[1e-4,1e-2] space.weighting=[learned,equal]
    python -m tune.search --config configs/demo.yaml --cluster slurm --nodes 2 --cpus-per-node 8   # an sbatch job

Each trial trains the base config with its sampled values on a ``TorchTrainer`` of its own (the workers
of ``pipeline.train``); the objective, reported every epoch, is ``tune.objective``'s. A search is the
folder ``runs_dir/name`` (see ``tune.results``). Starting a search again with the same name resumes it
(``Tuner.restore``): finished trials are kept, unfinished ones continue from their last epoch checkpoint.

This module is the command: arguments, the checks made before anything starts, and where the search runs
(``--cluster local``: here or on ``RAY_ADDRESS``, ``tune.tuner``; ``--cluster slurm``: ``tune.slurm``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.cluster import ClusterTooSmall
from pipeline.config import ConfigError, load_config, load_config_dict, to_dict
from pipeline.data import DataConfigError
from tune.objective import load_baselines
from tune.results import BEST_CONFIG_FILE, TRIALS_FILE
from tune.slurm import add_slurm_arguments, describe_submission, slurm_options, submit_search, wait_for_job
from tune.space import GRIDS, OVERRIDE_PREFIX, SearchSpace, check_against_config, load_space


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


def load_base_and_space(args: argparse.Namespace) -> tuple[dict[str, Any], SearchSpace]:
    """The base training config (YAML + overrides, ``--runs-dir``) and the search space, both validated,
    with the search options and the baselines checked against them."""
    base = load_config(args.config, [o for o in args.overrides if not o.startswith(OVERRIDE_PREFIX)])
    space = load_space(args.space, [o for o in args.overrides if o.startswith(OVERRIDE_PREFIX)], args.grid)
    document = to_dict(base) | ({"runs_dir": args.runs_dir} if args.runs_dir else {})
    check_against_config(space, document)
    check_search_options(args, space, load_config_dict(document).max_epochs)
    if args.baselines:
        load_baselines(args.baselines)
    return document, space


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="base training config (YAML, see configs/)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value for the training config, space.<key>=value for the space")
    parser.add_argument("--space", type=Path, help="search space YAML (keys: see tune/space.py)")
    parser.add_argument("--grid", choices=sorted(GRIDS),
                        help="try every λ of a named grid (thesis: 0.001, 0.01, 0.1, 1)")
    parser.add_argument("--num-samples", type=int, default=8, help="trials (with a grid: samples per grid value)")
    parser.add_argument("--scheduler", choices=["asha", "fifo", "pbt"], default="asha",
                        help="asha stops trailing trials early; pbt lets trailing trials adopt leading ones' state")
    parser.add_argument("--perturbation-interval", type=int, default=1,
                        help="PBT: epochs between exploit/explore steps")
    parser.add_argument("--quantile-fraction", type=float, default=0.25,
                        help="PBT: the bottom fraction adopts the state of the top fraction")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    parser.add_argument("--reduction-factor", type=float, default=3, help="ASHA: keep the best 1/factor at each rung")
    parser.add_argument("--search", choices=["random", "optuna"], default="random", help="optuna needs facemtl[tune]")
    parser.add_argument("--baselines", type=Path, help="YAML of single-task results (task: MAE or accuracy): "
                        "the objective becomes Δm, the mean %% improvement over them")
    parser.add_argument("--seed", type=int, help="seed of the sampler (default: the config's seed)")
    parser.add_argument("--max-concurrent", type=int, default=0,
                        help="trials at a time (0: as many as the cluster holds); more than it holds is an error")
    parser.add_argument("--max-failures", type=int, default=2,
                        help="worker failures a trial's run recovers from, and trial failures Tune retries")
    parser.add_argument("--cluster", choices=["local", "slurm"], default="local",
                        help="local: this machine (or RAY_ADDRESS); slurm: an sbatch job (options below)")
    parser.add_argument("--name", default="search", help="the search folder is <runs-dir>/<name>")
    parser.add_argument("--runs-dir", help="default: the config's runs_dir")
    add_slurm_arguments(parser)
    return parser


def submit_to_slurm(args: argparse.Namespace, argv: list[str], base_document: dict[str, Any]) -> int:
    """Submit the checked search; with ``--wait``, follow it to its end."""
    search_dir = Path(base_document["runs_dir"]).resolve() / args.name
    # The job runs this command with --cluster local on its Ray cluster, from this working folder.
    search_argv = [sys.executable, "-m", "tune.search", *argv, "--cluster", "local", "--runs-dir",
                   str(search_dir.parent)]
    job = submit_search(search_argv, search_dir, slurm_options(args))
    print(describe_submission(job, search_dir), flush=True)
    return wait_for_job(job) if args.wait else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        base_document, space = load_base_and_space(args)
        if args.cluster == "slurm":
            return submit_to_slurm(args, argv, base_document)
        from tune.tuner import SearchFailed, run_search  # Ray only from here on

        try:
            search_dir = run_search(args, base_document, space, ["python", "-m", "tune.search", *argv])
        except SearchFailed as error:
            print(f"search failed: {error}", file=sys.stderr)
            return 1
    except (ConfigError, DataConfigError, ClusterTooSmall, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\ndone in {time.perf_counter() - started:.0f} s. Results in {search_dir}:")
    print(f"  {TRIALS_FILE}, {BEST_CONFIG_FILE} (python -m pipeline.train --config {search_dir / BEST_CONFIG_FILE}), "
          f"one folder per trial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
