"""TensorBoard's HParams view of a search: one experiment at the search folder, one session per trial.

    <search>/events.out.tfevents.hparams-experiment   the hyperparameters with their domains, and the metrics
    <search>/<trial_id>/train/tensorboard/            a trial's run: RunRecorder's scalars and the trial's
                                                      session (its values, start, end) with ``objective`` per epoch

``tensorboard --logdir <search>`` then lists every trial as one row of the HParams table, with the last
value of each metric in its run. Written with the tensorboard package's protobufs only (no TensorFlow).

TensorBoard keeps the first session start and the first session end of a run: a resumed trial writes no
second start, and a trial Tune retries must not be closed as failed. To follow a running search, use
TensorBoard's Rust loader (``--load_fast=auto``, the default, with tensorboard-data-server installed): the
Python one reads one event file of a run at a time and sees the session's later writes only when restarted.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from google.protobuf import struct_pb2
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard.summary import scalar
from torch.utils.tensorboard.writer import FileWriter

from pipeline.schema import get_task
from tune.objective import OBJECTIVE
from tune.space import CONFIG_KEYS, SearchSpace

TOTAL_LOSS = "val/total_loss"
# A fixed name (it holds "tfevents", which is how TensorBoard finds event files): a resumed search
# replaces this file instead of adding a second experiment.
EXPERIMENT_FILE = "events.out.tfevents.hparams-experiment"
EVENT_FILE_VERSION = "brain.Event:2"


def write_search_experiment(search_dir: Path, space: SearchSpace, tasks: Sequence[str]) -> None:
    """The experiment of a search (hyperparameters, domains, metrics) in ``search_dir``'s own run; idempotent."""
    experiment = api_pb2.Experiment(
        description="facemtl search: one session per trial; objective = mean normalized score over tasks",
        time_created_secs=time.time(),
        hparam_infos=hparam_infos(space),
        metric_infos=metric_infos(tasks),
    )
    summary = _hparams_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))
    _replace_event_file(Path(search_dir) / EXPERIMENT_FILE, summary)


def hparam_infos(space: SearchSpace) -> list[api_pb2.HParamInfo]:
    """lr and λ as real intervals (λ's grid as its values), patience as an interval of integers, weighting's choices."""
    infos = [
        _number_hparam("lr", "learning rate", "log-uniform", interval=space.lr),
        _number_hparam("lam", "λ", "grid" if space.lam_grid else "log-uniform",
                       interval=None if space.lam_grid else space.lam, values=space.lam_grid),
        _number_hparam("patience", "Early-Freeze patience", "integer, both ends included", interval=space.patience),
    ]
    if space.weighting is not None:
        infos.append(api_pb2.HParamInfo(
            name="weighting", display_name="loss weighting", description=f"{CONFIG_KEYS['weighting']}, a choice",
            type=api_pb2.DATA_TYPE_STRING, domain_discrete=_list_value(space.weighting),
        ))
    return infos


def _number_hparam(name: str, display_name: str, sampling: str, interval: Sequence[float] | None = None,
                   values: Sequence[float] = ()) -> api_pb2.HParamInfo:
    info = api_pb2.HParamInfo(name=name, display_name=display_name, description=f"{CONFIG_KEYS[name]}, {sampling}",
                              type=api_pb2.DATA_TYPE_FLOAT64)
    if interval is None:
        info.domain_discrete.CopyFrom(_list_value(values))
    else:
        info.domain_interval.min_value, info.domain_interval.max_value = interval
    return info


def _list_value(values: Sequence[float | str]) -> struct_pb2.ListValue:
    listed = struct_pb2.ListValue()
    listed.extend(values)
    return listed


def metric_infos(tasks: Sequence[str]) -> list[api_pb2.MetricInfo]:
    """The search objective, each task's main validation metric (accuracy, or MAE for age) and the total loss."""
    described = {OBJECTIVE: "search objective: mean normalized score over tasks, higher is better"}
    for task in tasks:
        spec = get_task(task)
        better = "lower" if spec.lower_is_better else "higher"
        described[f"val/{task}/{spec.metric}"] = f"{task}: validation {spec.metric}, {better} is better"
    described[TOTAL_LOSS] = "weighted total validation loss, lower is better"
    return [
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=tag, description=description,
                           dataset_type=api_pb2.DATASET_VALIDATION)
        for tag, description in described.items()
    ]


class TrialHParams:
    """One trial's HParams session, written into the trial's own TensorBoard run folder (RunRecorder's).

    Its own event file next to RunRecorder's: TensorBoard reads every event file of a run folder as one run.
    """

    def __init__(self, log_dir: Path, hparams: dict[str, float | int | str]) -> None:
        start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for name, value in hparams.items():
            _set_value(start.hparams[name], name, value)
        resumed = has_session_start(Path(log_dir))  # before the writer adds its own (empty) file
        self.writer = FileWriter(str(log_dir))
        self.closed = False
        if not resumed:
            start_data = plugin_data_pb2.HParamsPluginData(session_start_info=start)
            self._write_hparams(metadata.SESSION_START_INFO_TAG, start_data)

    def record(self, epoch: int, objective: float) -> None:
        """The search objective of one epoch, as the scalar ``objective`` at step ``epoch``."""
        self.writer.add_summary(scalar(OBJECTIVE, objective), epoch)
        self.writer.flush()

    def close(self, status: str = "success") -> None:
        """End the session with a status (success, failure, running, unknown); again: nothing.

        TensorBoard shows a run's first end only: close with ``failure`` once the trial will not be retried.
        """
        if self.closed:
            return
        end = plugin_data_pb2.SessionEndInfo(status=session_status(status), end_time_secs=time.time())
        self._write_hparams(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))
        self.writer.close()
        self.closed = True

    def _write_hparams(self, tag: str, plugin_data: plugin_data_pb2.HParamsPluginData) -> None:
        self.writer.add_summary(_hparams_summary(tag, plugin_data), 0)
        self.writer.flush()


def has_session_start(log_dir: Path) -> bool:
    """Whether an event file in ``log_dir`` already starts an HParams session (a resumed trial)."""
    for path in sorted(log_dir.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            if any(value.tag == metadata.SESSION_START_INFO_TAG for value in event.summary.value):
                return True
    return False


def session_status(name: str) -> int:
    """``api_pb2.Status`` of a name such as ``success``; errors list the known names."""
    known = [status.removeprefix("STATUS_").lower() for status in api_pb2.Status.keys()]
    if name not in known:
        raise ValueError(f"unknown session status {name!r}; expected one of {', '.join(known)}")
    return api_pb2.Status.Value(f"STATUS_{name.upper()}")


def _set_value(slot: struct_pb2.Value, name: str, value: float | int | str) -> None:
    if isinstance(value, str):
        slot.string_value = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        slot.number_value = value
    else:
        raise TypeError(f"hyperparameter {name}: expected a number or a string, got {value!r}")


def _hparams_summary(tag: str, plugin_data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    """A summary holding only metadata: the HParams plugin reads its data from the metadata."""
    value = summary_pb2.Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(plugin_data),
                                      tensor=metadata.NULL_TENSOR)
    return summary_pb2.Summary(value=[value])


def _replace_event_file(path: Path, summary: summary_pb2.Summary) -> None:
    """A one-summary event file at ``path``, replaced atomically (a TensorBoard reading it sees old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".hparams-experiment.{os.getpid()}.tmp")  # no "tfevents": unseen while written
    wall_time = time.time()
    with temporary.open("wb") as handle:
        records = RecordWriter(handle)
        records.write(event_pb2.Event(wall_time=wall_time, file_version=EVENT_FILE_VERSION).SerializeToString())
        records.write(event_pb2.Event(wall_time=wall_time, step=0, summary=summary).SerializeToString())
    os.replace(temporary, path)
