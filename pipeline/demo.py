"""``python -m pipeline.demo`` (``make demo``): the main job on the embedded synthetic faces.

1. Shard: three synthetic datasets that mimic the label coverage of real ones (a UTKFace-like set with
   age, gender and race; a FER2013-like set with emotion only; a CelebA-like set with gender, smile
   and young), drawn and sharded exactly as real data would be (``pipeline.shard``).
2. Train: ``configs/demo.yaml`` with Ray Train on a local Ray (``pipeline.train``): one network for all
   six tasks through the task-balanced sampler, learned loss weights, Early Freeze.
3. Print the validation metrics of the best epoch next to the chance level of each task.
4. Search: a small Ray Tune search over lr, λ and Early-Freeze patience (``tune.search``, ASHA) on the
   same shards with shorter epochs, then its HTML report (``tune.report``) and TensorBoard's HParams view.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import load_config
from pipeline.run_summary import format_summary_table, read_run_summary
from pipeline.shard import main as shard_main
from pipeline.train import main as train_main

SEARCH_NAME = "demo-search"
# The demo's search: 4 trials of up to 3 short epochs, ASHA halving at every epoch, one trial at a time on
# 2 cores. Loader processes would only compete with the trial's own worker for those cores.
SEARCH_OVERRIDES = ("max_epochs=3", "data.steps_per_epoch=20", "data.loader_workers=0")
SEARCH_OPTIONS = ("--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "2", "--seed", "0")

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass(frozen=True)
class DemoDataset:
    name: str
    tasks: str
    num_samples: int
    seed: int


DEMO_DATASETS = (
    DemoDataset("synth-utkface", "age,gender,race", 3000, seed=1),
    DemoDataset("synth-fer2013", "emotion", 2000, seed=2),
    DemoDataset("synth-celeba", "gender,smile,young", 2000, seed=3),
)


def shard_demo_datasets(shard_root: Path, image_size: int, workers: int, scale: float = 1.0) -> list[Path]:
    """Draw and shard every demo dataset; an existing complete output is reused (the shard run resumes)."""
    out_dirs = []
    for dataset in DEMO_DATASETS:
        out_dir = shard_root / dataset.name
        code = shard_main(
            [
                "synthetic", "--name", dataset.name, "--tasks", dataset.tasks,
                "--num-samples", str(max(1, int(dataset.num_samples * scale))), "--seed", str(dataset.seed),
                "--size", str(image_size), "--samples-per-shard", "500", "--workers", str(workers),
                "--out", str(out_dir),
            ]
        )
        if code != 0:
            raise SystemExit(f"sharding {dataset.name} failed (exit {code})")
        out_dirs.append(out_dir)
    return out_dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=Path("shards/demo"), help="where the demo shards go")
    parser.add_argument("--workers", type=int, default=2, help="sharding processes")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dataset's size (quick runs)")
    parser.add_argument("--search-trials", type=int, default=4, help="trials of the small search (0: no search)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo.yaml")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    config = load_config(DEMO_CONFIG, args.overrides)
    shard_dirs = shard_demo_datasets(args.shards, config.data.image_size, args.workers, args.scale)
    datasets = "[" + ",".join(str(path) for path in shard_dirs) + "]"
    code = train_main(["--config", str(DEMO_CONFIG), f"data.datasets={datasets}", *args.overrides])
    if code != 0:
        return code
    print(f"\nvalidation metrics of the best epoch ({config.run_dir}), synthetic data:")
    print(format_summary_table(read_run_summary(config.run_dir)))
    search_dir = None
    if args.search_trials:
        search_dir = run_demo_search(datasets, args.search_trials, args.overrides, config.runs_dir)
        if search_dir is None:
            return 1
    print(f"\ndemo done in {time.perf_counter() - started:.0f} s.")
    print(f"  shards:      {args.shards}/ (manifest.parquet, summary.json, wids indices)")
    print(f"  run:         {config.run_dir}/ (best_model.pt, metrics.parquet, checkpoints)")
    print(f"  dashboards:  tensorboard --logdir {config.run_dir}/tensorboard")
    if search_dir is not None:
        print(f"  search:      {search_dir}/ (trials.parquet, best_config.yaml)")
        print(f"  report:      {search_dir / 'report' / 'index.html'}")
        print(f"  HParams:     tensorboard --logdir {search_dir}  (the HPARAMS tab)")
    return 0


def run_demo_search(datasets: str, trials: int, overrides: list[str], runs_dir: Path) -> Path | None:
    """The small search of step 4 and its report; None when it failed (its error is printed)."""
    from tune.report import main as report_main
    from tune.search import main as search_main

    print(f"\nsearching lr, λ and patience: {trials} trials (ASHA) on the same shards", flush=True)
    search_args = ["--config", str(DEMO_CONFIG), f"data.datasets={datasets}", *overrides, *SEARCH_OVERRIDES,
                   "--num-samples", str(trials), *SEARCH_OPTIONS, "--name", SEARCH_NAME]
    if search_main(search_args) != 0:
        return None
    search_dir = Path(runs_dir).resolve() / SEARCH_NAME
    return search_dir if report_main([str(search_dir)]) == 0 else None


if __name__ == "__main__":
    sys.exit(main())
