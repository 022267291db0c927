"""``python -m pipeline.experiments NAME``: the seed thesis' comparisons, one command each.

    python -m pipeline.experiments mtl-vs-single --config configs/utkface.yaml              # Tables 4.6-4.15
    python -m pipeline.experiments weighting --config configs/celeba.yaml --seeds 3          # Tables 5.1-5.3
    python -m pipeline.experiments freeze --config configs/utkface.yaml                      # Table 5.4
    python -m pipeline.experiments lambda --config configs/utkface.yaml max_epochs=10 --local  # Table 5.5
    python -m pipeline.experiments transfer --config configs/utkface.yaml --init-from runs/fer-utkface --seeds 3

An experiment is a set of training runs ("arms") of one config that differ in one thing, each trained with
seeds 0..N-1 through ``pipeline.train`` (Ray Train on a local Ray or the cluster named by ``RAY_ADDRESS``;
``--local``: in this process, no Ray). Everything lands in ``runs_dir/<out name>/`` (default out name: NAME):

    <arm>-seed<k>/     one run folder per arm and seed (pipeline.train's layout)
    results.parquet    one row per arm x seed: every validation metric of the run's best epoch
    table.md           the comparison table (also printed): mean ± std over seeds, chance level, Δm
    plot.png           one bar chart per task, one bar per row, error bars = std over seeds
    results-test.parquet, table-test.md, plot-test.png
                       the same on the test split (``--split test``): each run's best_model.pt evaluated
                       by pipeline.evaluate, whose report lands in <arm>-seed<k>/evaluation/test/; a report
                       there newer than best_model.pt, of the shard folders the run's config names as they
                       are now (summary.json digests), is used as it is (``--reevaluate``: evaluate again)
    selections/<selection>/
                       the same files for a selection of arms (``--arms``, ``--baseline``, below), e.g.
                       selections/none-vs-early-freeze/: the full experiment's table is never replaced by one
                       of fewer arms or another reference

Running the same command again skips finished runs (metrics.parquet reached ``max_epochs`` or every task
froze/stopped), resumes unfinished ones and refuses a run folder whose saved config differs from the
arm's (other than ``max_epochs``, ``keep_checkpoints``, ``name`` and ``runs_dir``): choose another ``--name`` for
another config. A folder where nothing was
trained yet (a start that failed on a wrong path, say) starts again under the arm's config, as it would in
``pipeline.train``. ``--status`` trains and writes nothing: it prints each arm x seed's state (finished, the
epochs a partly trained run has, not started, the finished run it reuses or would), the epochs left with an
estimate, and the validation table of the runs finished so far (a row short of seeds says how many it has).
Several invocations of the same command can share an experiment (terminals, SLURM jobs on a shared runs folder):
each run is claimed while it trains (:mod:`pipeline.run_claims`), another invocation skips it (``dwa-seed1: in
training by pid 4242 on node3 since ...``), trains the next and, at its end, tries the runs it skipped again (their
holder may have died); ``--status`` names who trains what. An invocation that ends while a run is unfinished
writes no table; the one of the same command that finishes the last run does.
Where the runs folder is not kept between sessions, ``python -m pipeline.run_archive save|restore`` carries the
finished runs' records (no weights) elsewhere and back; ``--split test`` reports a restored run from the test
evaluation recorded for its best epoch.

Experiments share runs: with configs/utkface.yaml, ``mtl-vs-single``'s MTL, ``weighting``'s learned, ``freeze``'s
early-freeze, ``lambda``'s λ=0.1 and ``transfer``'s ImageNet start are one run per seed. So an arm x seed without
a run folder yet first looks for a finished run of the same config in the other experiment folders under the same
``runs_dir`` (``runs_dir/*/*/config.yaml``; the same config: equal in every key but ``name``, ``runs_dir`` and
``keep_checkpoints``, ``max_epochs`` included). If there is one, ``<arm>-seed<k>`` becomes a relative link to it,
a line says which (``learned-seed0: same config as ../mtl-vs-single/mtl-seed0 (finished): reused, not trained``;
the first by path where several match) and the experiment uses it as its own finished run (results, table,
``--split test``, whose report then lands in the linked folder). ``invocations.jsonl`` records the links
(``reused_runs``). Later invocations keep a link while it points to a finished run of the arm's config, and
remove it (never its target) otherwise. An unfinished run is not reused, but one that another invocation is training
now (``freeze`` and ``lambda`` started together, say) is not trained a second time: an invocation claims a run's config
too while it trains it (``runs_dir/.config-claims/``, :func:`pipeline.experiment_reuse.config_claim_path`), so an arm
whose config is claimed is left to that invocation, linked at this one's end if the run has finished by then
(``invocations.jsonl`` gets a line with ``linked_at_end``), otherwise left out (no table yet; the same command later
links it), or trained here if that process ended without finishing it. ``--no-reuse`` removes the links and trains
every arm in this experiment's folder. Only links recorded in ``invocations.jsonl`` are reuse's: a run
folder the user linked (to a scratch disk, say) is resumed like any other.

The experiments (``freeze.mode`` and ``loss.weighting`` values are those of pipeline.config):

- ``mtl-vs-single``: the config as it is (row "MTL") and one single-task model per task (row
  "single-task"), or per task of ``--single-tasks`` (e.g. ``Smiling,Male,landmarks`` of CelebA's 41: the
  table then has every task's MTL figure, single-task figures and Δm for those only). A single-task model
  is the same config restricted to its task: ``data.tasks`` = [task],
  ``data.datasets`` = the datasets that label it, ``loss.weighting=fixed`` with the one-hot weight
  {task: 1}. That is the 2019 lab notes' one-hot ``loss_weights`` without the idle heads: with all heads
  kept, the untrained tasks' losses would still choose the best epoch (lowest total validation loss),
  drive the lr plateau and Early Freeze, and take batch share from the sampler. With the default
  ``data.steps_per_epoch: 0`` a single-task epoch covers its own datasets' training samples once.
- ``weighting``: every registered strategy but ``fixed``: ``equal`` (the thesis' "average loss", the baseline),
  ``learned`` (eq. 3.5), ``uncertainty``, ``dwa``, ``rlw``, ``famo``, ``gradnorm``, ``dbmtl``, ``pcgrad``,
  ``alignedmtl``; ``--weightings`` chooses some (``equal`` always runs). ``uncertainty`` and ``gradnorm`` learn their
  weights at the network's lr (``optim.weighting_lr=0``), as their authors do; ``learned`` at the config's.
- ``freeze``: ``early-freeze`` (Algorithm 1), ``early-stop`` (converged tasks stop; the thesis' Table 5.4
  baseline), ``none``, ``early-freeze`` with Algorithm 1's cumulative counter, and (with 2+ tasks)
  ``early-freeze`` with ``freeze.trunk_quorum=2``.
- ``lambda``: λ of the learned weighting over the thesis' grid {0.001, 0.01, 0.1, 1} (Table 5.5).
- ``transfer`` (the lab notes' pretrain, then fine-tune): the config from its own start (the baseline, row
  "ImageNet start" with ``model.weights_path``, else "random start") and from the network of the run
  ``--init-from`` names (row "from <run>": ``model.init_from``, which loads the trunk and every head of the same
  task and shape), e.g. pretrained on FER2013 + UTKFace (``python -m pipeline.train --config
  configs/fer-utkface.yaml``: runs/fer-utkface), fine-tuned on UTKFace. Only this experiment takes
  ``--init-from``; the path, the file read and the config its weights were trained with go into
  ``invocations.jsonl``.

``--arms`` trains some arms only, by arm name (``none``, not ``none-seed0``; the baseline always runs), and
``--baseline`` names the arm every row is measured against in place of the experiment's own: ``freeze --arms none
--baseline early-freeze`` is Algorithm 1 against no freezing, two arms, while ``freeze`` alone measures all of its
arms against ``early-stop``. The runs are the experiment's own (a selection trains only those it lacks); its table,
plot and results go to ``selections/<selection>/`` (here ``none-vs-early-freeze``), written by the invocation of
that selection that finishes its last run.

Metrics are those of each run's best epoch (lowest val/total_loss, the epoch saved as best_model.pt): with
``--split val`` (the default) its validation metrics, read from its metrics.parquet; with ``--split test``
best_model.pt evaluated on the test split (:func:`pipeline.evaluate.evaluate_checkpoint`), the numbers a
paper reports, since the validation split chose the epoch. The table's caption names the split.

Δm (Maninis et al. 2019) summarises a row against the experiment's baseline row in one number:
Δm = (1/T) Σ_t (-1)^{l_t} (M_t - M_base,t) / M_base,t x 100 %, l_t = 1 where lower is better (MAE), so a
positive Δm is an improvement. M_base is the baseline row's mean over seeds; each seed of a row gets its own
Δm, and the table shows their mean ± std (the mean equals the Δm of the row's means). Undefined (shown –) where
a baseline metric is 0. With two seeds or more, a task's cell marked † differs from the baseline row's beyond the
seed spread (Welch's t-test over the two rows' seeds, two-sided p < 0.05, one uncorrected test per cell: a table
of 27 cells expects about one mark by chance). With 3 seeds such a test only passes large, consistent differences:
an unmarked cell is "not shown to differ", not "equal".
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from pipeline.config import ConfigError, TrainConfig, load_config, with_absolute_paths
from pipeline.data import DataConfigError, ShardSet, open_shard_set, resolve_tasks
from pipeline.experiment_arms import (
    EXPERIMENTS, Arm, ExperimentError, arm_overrides, baseline_row, check_transfer_source, chosen_arms,
    experiment_arms, selection_name,
)
from pipeline.experiment_invocations import describe_source, record_invocation, record_late_links
from pipeline.experiment_reuse import config_claim_path, link_reused_runs, sibling_run_configs
from pipeline.experiment_runs import check_run_folder, read_rows, result_record, run_is_finished, training_line
from pipeline.experiment_status import format_status, partial_row_labels, run_state
from pipeline.experiment_tables import (
    PLOT_FILE, RESULTS_FILE, SPLIT_NAMES, TABLE_FILE, CellStats, delta_m_by_row, format_table, plot_comparison,
    split_file, summarize, write_results,
)
from pipeline.run_claims import claim_holder, claimed, describe_holder
from pipeline.run_summary import chance_levels
from pipeline.schema import TaskSpec, get_task
from pipeline.train import check_init_from
from pipeline.train import main as train_main
from pipeline.training_setup import declare_config_tasks

SPLIT_CHOICES = ("val", "test")
SELECTIONS_DIR = "selections"  # the tables of --arms/--baseline selections, one folder each


def format_estimate(trained: Sequence[tuple[float, int]], remaining_runs: int, epochs_per_run: int) -> str:
    """How long the remaining runs may take at most, from the seconds per epoch of the (seconds, epochs) trained
    so far: per epoch, since a resumed run trains only the epochs it had left."""
    epochs = sum(count for _, count in trained)
    if not epochs or not remaining_runs:
        return ""
    per_epoch = sum(seconds for seconds, _ in trained) / epochs
    minutes = per_epoch * remaining_runs * epochs_per_run / 60
    return (f"; at most about {minutes:.0f} min left for {remaining_runs} more run(s) of up to {epochs_per_run} "
            f"epochs ({per_epoch / 60:.1f} min per epoch here)")


class ArmOutcome(NamedTuple):
    run_dir: Path
    trained: tuple[float, int] | None  # seconds and epochs trained now; None when skipped
    held_elsewhere: bool = False  # another process holds its claim (and trains it)


def train_arm(config_path: Path | None, run_overrides: Sequence[str], config: TrainConfig,
              local: bool) -> ArmOutcome:
    """Train one arm x seed (``config``, the config file with ``run_overrides``) through ``pipeline.train`` unless
    its run folder is finished or another process holds its claim (:mod:`pipeline.run_claims`)."""
    if run_is_finished(read_rows(config.run_dir), config.max_epochs):
        print(f"{config.run_dir.name}: finished, skipped", flush=True)
        return ArmOutcome(config.run_dir, None)
    with claimed(config.run_dir) as mine:
        if not mine:
            holder = describe_holder(claim_holder(config.run_dir) or {})
            print(f"{config.run_dir.name}: in training by {holder}, skipped here", flush=True)
            return ArmOutcome(config.run_dir, None, held_elsewhere=True)
        rows_before = read_rows(config.run_dir)  # again: it may have finished while another process held it
        if run_is_finished(rows_before, config.max_epochs):
            print(f"{config.run_dir.name}: finished (by another process), skipped", flush=True)
            return ArmOutcome(config.run_dir, None)
        started = time.perf_counter()
        argv = [*(["--config", str(config_path)] if config_path else []), *run_overrides,
                *(["--local"] if local else [])]
        code = train_main(argv)
    if code != 0:
        raise ExperimentError(f"training {config.run_dir} failed (exit {code}); its output is above. "
                              "Running the experiment again resumes it and skips the finished runs")
    epochs = len(read_rows(config.run_dir)) - len(rows_before)
    return ArmOutcome(config.run_dir, (time.perf_counter() - started, epochs))


@dataclass
class ExperimentPlan:
    """Every arm x seed of one experiment, with its config, before anything is trained or written."""

    base: TrainConfig
    shard_sets: list[ShardSet]
    task_names: list[str]
    arms: list[Arm]
    experiment_dir: Path
    runs: list[tuple[Arm, int]]
    overrides_by_run: list[list[str]]
    configs: list[TrainConfig]
    source: dict[str, Any] | None  # the --init-from run, described
    output_dir: Path  # where table, plot and results go: experiment_dir, or the --arms/--baseline selection's folder


def plan_experiment(experiment: str, config_path: Path | None, overrides: Sequence[str], seeds: int,
                    out_name: str | None, single_tasks: Sequence[str] = (), weightings: Sequence[str] = (),
                    init_from: Path | None = None, arm_names: Sequence[str] = (),
                    baseline: str | None = None) -> ExperimentPlan:
    """The arms (those ``arm_names`` lists and the baseline, ``baseline`` where given: :func:`chosen_arms`), seeds
    and configs of an experiment, its shards opened and its ``--init-from`` checked; nothing is created on disk
    (``--status`` reads only)."""
    base = with_absolute_paths(load_config(config_path, overrides))
    shard_sets = [open_shard_set(path) for path in base.data.datasets]
    declare_config_tasks(base)
    task_names = resolve_tasks(shard_sets, base.data.tasks)
    datasets_by_task = {task: [path for path, s in zip(base.data.datasets, shard_sets) if s.labelled_fraction(task) > 0]
                        for task in task_names}
    init_from = init_from.resolve() if init_from else None  # absolute: a run's saved config must not depend on cwd
    every_arm = experiment_arms(experiment, task_names, datasets_by_task, single_tasks, weightings, init_from,
                                base.model.weights_path)
    arms = chosen_arms(experiment, every_arm, arm_names, baseline)
    source = None
    if init_from is not None:
        check_init_from(init_from)
        source = describe_source(init_from)
        check_transfer_source(source["config"], base)
    experiment_dir = Path(base.runs_dir) / (out_name or experiment)
    selection = selection_name(every_arm, arms)
    runs = [(arm, seed) for arm in arms for seed in range(seeds)]
    overrides_by_run = [[*overrides, *arm_overrides(arm, seed, experiment_dir)] for arm, seed in runs]
    configs = [with_absolute_paths(load_config(config_path, run_overrides)) for run_overrides in overrides_by_run]
    return ExperimentPlan(base, shard_sets, task_names, arms, experiment_dir, runs, overrides_by_run, configs, source,
                          experiment_dir / SELECTIONS_DIR / selection if selection else experiment_dir)


class ExperimentOutcome(NamedTuple):
    output_dir: Path  # the plan's: where the table went, or would have
    unfinished: list[str]  # runs not finished when this invocation ended; then no table was written
    awaited: dict[str, str]  # of those, the runs whose config another experiment was training: who trained it


def run_experiment(experiment: str, config_path: Path | None, overrides: Sequence[str], seeds: int,
                   out_name: str | None, local: bool, split: str = "val", command: Sequence[str] = (),
                   single_tasks: Sequence[str] = (), weightings: Sequence[str] = (),
                   init_from: Path | None = None, reuse: bool = True, reevaluate: bool = False,
                   arm_names: Sequence[str] = (), baseline: str | None = None) -> ExperimentOutcome:
    """Train every arm x seed (skipping finished runs and runs another process is training; with ``reuse``, linking
    to a finished run of the same config in a sibling experiment folder, and leaving an arm whose config another
    invocation trains now to that one), then write the results, table and plot of ``split``. Runs found held are
    tried again at the end (linked if their config's run finished meanwhile, trained if their holder ended before
    finishing it). Where runs are unfinished then, nothing is written: the invocation of this command (its
    ``--arms``/``--baseline`` selection) that finishes the last run writes it (once where several finish
    together), or, where another experiment trained it, this command run again."""
    plan = plan_experiment(experiment, config_path, overrides, seeds, out_name, single_tasks, weightings, init_from,
                           arm_names, baseline)
    experiment_dir, runs, configs = plan.experiment_dir, plan.runs, plan.configs
    experiment_dir.mkdir(parents=True, exist_ok=True)
    print(f"experiment {experiment}: {len(plan.arms)} arm(s) x {seeds} seed(s) -> {experiment_dir}", flush=True)
    reused = link_reused_runs(configs, experiment_dir, reuse)  # first: a stale link is removed, not refused below
    record_invocation(experiment_dir, command, plan.shard_sets, plan.source, reused)  # links made are recorded as ours
    for config in configs:  # before anything trains: a folder of another config refuses the experiment
        check_run_folder(config)
    durations, total, awaited = [], len(runs), {}

    def train(index: int) -> bool:
        """Train run ``index`` unless it is finished or, with ``reuse``, a finished run of its config is found now;
        False where another process holds it or its config."""
        (arm, seed), config = runs[index], configs[index]
        name = config.run_dir.name
        print(f"\n[{index + 1}/{total}] {arm.name}, seed {seed}", flush=True)
        left = not run_is_finished(read_rows(config.run_dir), config.max_epochs)
        config_claim = claimed(config_claim_path(experiment_dir, config)) if reuse and left else nullcontext(True)
        with config_claim as mine:
            run_holder = None if mine else claim_holder(config.run_dir)
            if run_holder is not None:  # this experiment's other invocation
                print(f"{name}: in training by {describe_holder(run_holder)}, skipped here", flush=True)
                return False
            if not mine:  # another experiment's invocation trains a run of this config
                awaited[name] = describe_holder(claim_holder(config_claim_path(experiment_dir, config)) or {})
                print(f"{name}: a run of this config is in training by {awaited[name]}: not trained here too",
                      flush=True)
                return False
            awaited.pop(name, None)
            if reuse and not config.run_dir.exists() and not config.run_dir.is_symlink():
                late = link_reused_runs([config], experiment_dir)  # finished since this invocation began
                if late:
                    reused.update(late)
                    record_late_links(experiment_dir, command, late)
                    return True
            outcome = train_arm(config_path, plan.overrides_by_run[index], config, local)
        if outcome.trained is not None:
            durations.append(outcome.trained)
            remaining = sum(later.run_dir.name not in reused for later in configs[index + 1:])
            estimate = format_estimate(durations, remaining, plan.base.max_epochs)
            print(f"{outcome.run_dir.name}: trained {outcome.trained[1]} epoch(s) in "
                  f"{outcome.trained[0] / 60:.1f} min{estimate}", flush=True)
        return not outcome.held_elsewhere

    held = [index for index in range(total) if not train(index)]
    # Tried again once: a run whose holder ended too soon is trained here, one whose config's run finished is linked.
    # Those held by this experiment's own invocations first: training them takes a while, for the rest to finish.
    for index in sorted(held, key=lambda index: configs[index].run_dir.name in awaited):
        config = configs[index]
        if not run_is_finished(read_rows(config.run_dir), config.max_epochs) and claim_holder(config.run_dir) is None:
            train(index)
    unfinished = [config.run_dir.name for config in configs
                  if not run_is_finished(read_rows(config.run_dir), config.max_epochs)]
    if unfinished:
        others = {config.run_dir.name: awaited[config.run_dir.name] for config in configs
                  if config.run_dir.name in unfinished and config.run_dir.name in awaited
                  and claim_holder(config.run_dir) is None}  # else this experiment's other invocation has it now
        return ExperimentOutcome(plan.output_dir, unfinished, others)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    with claimed(plan.output_dir / "table") as mine:  # invocations finishing together: one writes
        if not mine:
            print(f"\nanother invocation is writing the table in {plan.output_dir}", flush=True)
            return ExperimentOutcome(plan.output_dir, [], {})
        records = [result_record(experiment, arm, seed, config.run_dir, split, reevaluate)
                   for (arm, seed), config in zip(runs, configs)]
        write_table(experiment, plan, records, seeds, split)
    return ExperimentOutcome(plan.output_dir, [], {})


def write_table(experiment: str, plan: ExperimentPlan, records: Sequence[dict[str, Any]], seeds: int,
                split: str) -> None:
    output_dir = plan.output_dir
    table = results_table(experiment, plan, records, seeds, split)
    write_results(records, output_dir / split_file(RESULTS_FILE, split))
    (output_dir / split_file(TABLE_FILE, split)).write_text(table.markdown)
    plot_comparison(table.summary, table.tasks, table.chance, baseline_row(plan.arms),
                    f"{experiment} ({SPLIT_NAMES[split]}, {seeds} seed{'s' if seeds > 1 else ''})",
                    output_dir / split_file(PLOT_FILE, split))
    print(f"\n{table.markdown}")


class ResultsTable(NamedTuple):
    tasks: list[TaskSpec]
    summary: dict[str, dict[str, CellStats]]  # row -> task -> mean ± std over seeds
    chance: dict[str, float]
    markdown: str


def results_table(experiment: str, plan: ExperimentPlan, records: Sequence[dict[str, Any]], seeds: int, split: str,
                  row_labels: dict[str, str] | None = None) -> ResultsTable:
    """The table of ``records`` and what it is made of; ``row_labels`` renames rows in the Markdown only (a table of
    the runs finished so far says how many seeds each row has)."""
    tasks = [get_task(name) for name in plan.task_names]
    summary = summarize(records, list(dict.fromkeys(arm.row for arm in plan.arms)), tasks, split)
    chance = chance_levels(plan.shard_sets, tasks, split)
    baseline = baseline_row(plan.arms)
    deltas = delta_m_by_row(records, summary, baseline, tasks, split)
    table = format_table(experiment, baseline, summary, deltas, tasks, chance, seeds, split, row_labels)
    trained = training_line([Path(record["run_dir"]) for record in records])
    return ResultsTable(tasks, summary, chance, f"{table}\n{trained}\n" if trained else table)


def show_status(experiment: str, plan: ExperimentPlan, seeds: int, reuse: bool) -> None:
    """Print where the experiment stands and the validation table of its finished runs; trains and writes nothing."""
    siblings = sibling_run_configs(plan.experiment_dir) if reuse else None
    states = [run_state(config, plan.experiment_dir, siblings) for config in plan.configs]
    print(format_status(experiment, plan.experiment_dir, states))
    records = [result_record(experiment, arm, seed, state.run_dir, "val")
               for (arm, seed), state in zip(plan.runs, states) if state.finished and state.run_dir is not None]
    if not records:
        print("no finished run yet: no table")
        return
    labels = partial_row_labels(records, [arm.row for arm in plan.arms], seeds)
    table = results_table(experiment, plan, records, seeds, "val", labels).markdown
    print(f"\nThe finished runs so far (nothing written; the command without --status writes the table):\n\n{table}")


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", metavar="NAME", choices=EXPERIMENTS, help=" | ".join(EXPERIMENTS))
    parser.add_argument("--config", type=Path, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config, applied to every arm")
    parser.add_argument("--seeds", type=int, default=1, help="train every arm with seeds 0..N-1")
    parser.add_argument("--name", help="experiment folder under runs_dir (default: NAME)")
    parser.add_argument("--local", action="store_true", help="train in this process, no Ray")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="val",
                        help="split the table reports: val (from the runs' records) or test (best_model.pt evaluated, "
                             "or its recorded evaluation while that is of this best_model.pt and these shards)")
    parser.add_argument("--reevaluate", action="store_true",
                        help="with --split test: evaluate every best_model.pt again, even where its evaluation is "
                             "recorded (after a change to the evaluation code, say)")
    parser.add_argument("--single-tasks", default="",
                        help="mtl-vs-single: the tasks that get a single-task model, e.g. Smiling,Male,landmarks "
                             "(default all)")
    parser.add_argument("--weightings", default="",
                        help="weighting: the methods compared, e.g. learned,pcgrad (default every registered one but "
                             "fixed; equal, the baseline, is always run)")
    parser.add_argument("--arms", default="",
                        help="the arms trained, by arm name, e.g. freeze --arms none (default all; the baseline "
                             "always runs; the table goes to selections/<selection>/)")
    parser.add_argument("--baseline",
                        help="the arm every row is measured against (Δm, † marks) in place of the experiment's own, "
                             "e.g. freeze --baseline early-freeze")
    parser.add_argument("--no-reuse", action="store_true",
                        help="train every arm in this experiment's folder, even one whose config equals a finished "
                             "run of another experiment under runs_dir (default: link to that run)")
    parser.add_argument("--status", action="store_true",
                        help="train nothing: print each arm x seed's state, the epochs left with an estimate, and the "
                             "validation table of the runs finished so far")
    parser.add_argument("--init-from", type=Path,
                        help="transfer (required there, refused elsewhere): the pretrained run folder or best_model.pt "
                             "the fine-tuned arm starts from")
    args = parser.parse_intermixed_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    started = time.perf_counter()
    try:
        if args.status:
            plan = plan_experiment(args.experiment, args.config, args.overrides, args.seeds, args.name,
                                   comma_list(args.single_tasks), comma_list(args.weightings), args.init_from,
                                   comma_list(args.arms), args.baseline)
            show_status(args.experiment, plan, args.seeds, not args.no_reuse)
            return 0
        outcome = run_experiment(
            args.experiment, args.config, args.overrides, args.seeds, args.name, args.local, args.split,
            ["python", "-m", "pipeline.experiments", *(argv or sys.argv[1:])], comma_list(args.single_tasks),
            comma_list(args.weightings), args.init_from, not args.no_reuse, args.reevaluate, comma_list(args.arms),
            args.baseline)
    except (ConfigError, DataConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if outcome.unfinished:
        print(f"\nthis invocation's part done in {time.perf_counter() - started:.0f} s; not finished: "
              f"{', '.join(outcome.unfinished)}, held by another process (`--status` shows whether it still trains)")
        held_here = [name for name in outcome.unfinished if name not in outcome.awaited]
        if held_here:
            print(f"  {', '.join(held_here)}: the invocation of this command that finishes the last run writes the "
                  "table, else this command run again then")
        for name, holder in outcome.awaited.items():
            print(f"  {name}: a run of its config is in training by {holder}, perhaps in another experiment; run this "
                  "command again once it has finished: it links that run and writes the table")
        return 0
    print(f"experiment done in {time.perf_counter() - started:.0f} s. Results in {outcome.output_dir}:")
    files = (split_file(name, args.split) for name in (TABLE_FILE, PLOT_FILE, RESULTS_FILE))
    print("  {}, {}, {} (one row per arm x seed), <arm>-seed<k>/ (the runs)".format(*files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
