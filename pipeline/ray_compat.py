"""Every use of a Ray name that is not public API, in one place, checked against the installed Ray.

facemtl is tested on the Ray range of ``TESTED_RAY`` (pyproject.toml pins the same). ``check_ray()`` runs
before a command starts or joins Ray: on another Ray it stops with what to do, and every internal below is
resolved there too, so that a Ray that renamed one fails at start-up, loudly, never silently later.

What is here, and why (each one line; the story is in the commit messages):
- ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``: Ray Train re-routes ``print`` on its workers through logging, which
  shows every progress line twice.
- the logger of Ray Train's report INFO line (every metric of every epoch), which ``LoggingConfig`` does
  not reach.
- ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0``: a Ray node we stop serves nothing and need not drain for 30 s.
- the state API address of our cluster in every Ray process of a job: Ray Train's placement-group cleaner
  asks the state API whether its controller lives, and the state API finds "the" cluster through
  ``RAY_ADDRESS`` or /tmp/ray, not the one it runs in; asking another cluster on the machine, it removed a
  live run's placement group (ray-project/ray#54468 makes a connected worker default to its own cluster;
  Ray 2.60's ``ray.dashboard.utils`` does not).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

TESTED_RAY = ((2, 60), (2, 61))  # [first, end): the Ray minor versions the tests ran on
TESTED_RAY_SPEC = "ray[default,train,tune]>=2.60,<2.61"
UNTESTED_RAY_VARIABLE = "FACEMTL_UNTESTED_RAY"  # =1: try another Ray; each internal is still checked


class RayCompatError(RuntimeError):
    """The installed Ray is not one facemtl was tested on, or lacks an internal it relies on."""


def ray_version() -> tuple[int, int]:
    import ray

    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


def check_ray() -> None:
    """Stop with what to do when the installed Ray is outside ``TESTED_RAY`` or lacks an internal used here."""
    import ray

    first, end = TESTED_RAY
    if not first <= ray_version() < end and os.environ.get(UNTESTED_RAY_VARIABLE) != "1":
        raise RayCompatError(
            f"facemtl is tested on Ray {first[0]}.{first[1]} (it relies on a few Ray internals, listed in "
            f"pipeline/ray_compat.py), and Ray {ray.__version__} is installed. Install the tested Ray: "
            f"pip install '{TESTED_RAY_SPEC}'; or try this one with {UNTESTED_RAY_VARIABLE}=1 (each internal is "
            f"still checked, and a missing one stops the run)")
    train_report_logger_name()
    print_patch_variable()
    drain_timeout_variable()


def _internal(module: str, *names: str) -> ModuleType:
    try:
        found = importlib.import_module(module)
    except ImportError as error:
        raise _missing(f"module {module}", error) from None
    for name in names:
        if not hasattr(found, name):
            raise _missing(f"{module}.{name}", None)
    return found


def _missing(what: str, error: Exception | None) -> RayCompatError:
    import ray

    return RayCompatError(f"Ray {ray.__version__} has no {what}, which facemtl uses (see pipeline/ray_compat.py)"
                          f"{f': {error}' if error else ''}. Install the tested Ray: pip install '{TESTED_RAY_SPEC}'")


def train_report_logger_name() -> str:
    """Ray Train logs every report (each metric) at INFO under a logger named by its source file."""
    return _internal("ray.train.v2._internal.execution.context").__file__


def quiet_train_reports(level: str) -> None:
    """Hold Ray Train's per-report INFO line to ``level``, so a job's output shows our epoch lines only."""
    logging.getLogger(train_report_logger_name()).setLevel(level)


def print_patch_variable() -> str:
    """The variable that turns off Ray Train's re-routing of ``print`` (propagated to its workers)."""
    constants = _internal("ray.train.v2._internal.constants", "ENABLE_PRINT_PATCH_ENV_VAR", "ENV_VARS_TO_PROPAGATE")
    if constants.ENABLE_PRINT_PATCH_ENV_VAR not in constants.ENV_VARS_TO_PROPAGATE:
        raise _missing(f"propagation of {constants.ENABLE_PRINT_PATCH_ENV_VAR} to Ray Train workers", None)
    return constants.ENABLE_PRINT_PATCH_ENV_VAR


def drain_timeout_variable() -> str:
    """Ray's system setting for how long a stopping node drains (default 30 s), as an environment variable."""
    _internal("ray._private.ray_constants", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S")  # read from the environment
    return "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"


def job_environment(gcs_address: str | None = None, dashboard_url: str | None = None) -> dict[str, str]:
    """Environment variables for every Ray process of a job: plain worker output, and the state API of this
    cluster (by its address, or its dashboard's URL for a local Ray) for Ray Train's placement-group cleaner."""
    environment = {print_patch_variable(): "0"}
    if gcs_address:
        environment["RAY_ADDRESS"] = gcs_address
    if dashboard_url:
        environment["RAY_API_SERVER_ADDRESS"] = dashboard_url
    return environment


def node_environment() -> dict[str, str]:
    """Environment variables for ``ray start`` of a node that a job stops when it ends."""
    return {drain_timeout_variable(): "0"}
