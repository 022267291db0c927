"""docs/results.md's loss-weight picture: each weighting's task weights over the epochs of one seed's run, from the
``weights/<task>`` columns of the runs' metrics.parquet, as shares of their sum (a frozen task's weight is 0).

    python docs/img/loss_weights.py runs/utkface-weighting docs/img/utkface-weighting-weights.png [--seed 0]

Methods whose logged weights are constant by construction (equal, fixed, RLW's expected 1/K, the gradient-level
methods' 1 per task) are left out. FAMO logs z = softmax(xi); its network's effective weights are c z_i / L_i.
"""

import argparse
from pathlib import Path

import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

CONSTANT = {"equal", "fixed", "rlw", "pcgrad", "alignedmtl", "dbmtl", "nashmtl"}


def weight_shares(run_dir: Path) -> dict[str, list[float]]:
    """Task -> its weight's share of the epoch's weights, one per epoch."""
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    tasks = sorted(key.split("/", 1)[1] for key in rows[0] if key.startswith("weights/"))
    shares: dict[str, list[float]] = {task: [] for task in tasks}
    for row in rows:
        weights = {task: row.get(f"weights/{task}") or 0.0 for task in tasks}
        total = sum(weights.values()) or 1.0
        for task in tasks:
            shares[task].append(weights[task] / total)
    return shares


def plot(experiment_dir: Path, out: Path, seed: int) -> None:
    runs = [path for path in sorted(experiment_dir.glob(f"*-seed{seed}"))
            if path.name.removesuffix(f"-seed{seed}") not in CONSTANT and (path / "metrics.parquet").exists()]
    figure = Figure(figsize=(3.2 * len(runs), 3.0), layout="constrained")
    for index, run_dir in enumerate(runs):
        axes = figure.add_subplot(1, len(runs), index + 1, sharey=figure.axes[0] if index else None)
        shares_by_task = weight_shares(run_dir)
        for task, shares in shares_by_task.items():
            axes.plot(range(len(shares)), shares, marker=".", label=task)
        axes.set_title(run_dir.name.removesuffix(f"-seed{seed}"))
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.axhline(1 / len(shares_by_task), color="grey", linewidth=0.5, linestyle=":")
    figure.axes[0].set_ylabel("share of the loss weights")
    figure.axes[-1].legend(fontsize="small")
    FigureCanvasAgg(figure).print_png(str(out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    plot(args.experiment_dir, args.out, args.seed)
