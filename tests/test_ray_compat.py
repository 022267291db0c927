"""pipeline/ray_compat.py: the one place that touches Ray internals, checked against the installed Ray."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import ray_compat
from pipeline.ray_compat import RayCompatError, check_ray

REPO = Path(__file__).resolve().parents[1]
INTERNAL_NAMES = re.compile(r"_internal|_private|_create_default_callbacks|RESULT_DUPLICATE|ray_current_cluster")


def test_no_ray_internal_is_used_outside_the_compatibility_module() -> None:
    offending = []
    for folder in ("pipeline", "tune", "jobs"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in (".py", ".sh") or path.name == "ray_compat.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if INTERNAL_NAMES.search(line):
                    offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offending == []


def test_the_installed_ray_is_the_tested_one_and_has_every_internal_used() -> None:
    check_ray()
    assert ray_compat.print_patch_variable() == "RAY_TRAIN_ENABLE_PRINT_PATCH"
    assert ray_compat.train_report_logger_name().endswith("ray/train/v2/_internal/execution/context.py")


def test_another_ray_version_stops_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "__version__", "2.61.0")
    monkeypatch.delenv(ray_compat.UNTESTED_RAY_VARIABLE, raising=False)
    with pytest.raises(RayCompatError, match=r"tested on Ray 2\.60.*Ray 2\.61\.0 is installed.*"
                                             r"pip install 'ray\[default,train,tune\]>=2\.60,<2\.61'.*"
                                             r"FACEMTL_UNTESTED_RAY=1"):
        check_ray()
    monkeypatch.setenv(ray_compat.UNTESTED_RAY_VARIABLE, "1")
    check_ray()  # tried on purpose: every internal is still there, so it goes on


def test_a_ray_without_an_internal_names_it_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.v2._internal import constants

    monkeypatch.setenv(ray_compat.UNTESTED_RAY_VARIABLE, "1")
    monkeypatch.delattr(constants, "ENABLE_PRINT_PATCH_ENV_VAR")
    missing = r"has no ray\.train\.v2\._internal\.constants\.ENABLE_PRINT_PATCH_ENV_VAR, which facemtl uses"
    with pytest.raises(RayCompatError, match=missing + r".*pip install"):
        check_ray()


LOCAL_RAY_ASKS_ITS_OWN_STATE_API = """
import sys, time
import ray
from ray.util.state import get_actor
from pipeline.train import connect_ray

connect_ray(1)

@ray.remote(num_cpus=0)
class Alive:
    def actor_id(self):
        return ray.get_runtime_context().get_actor_id()

@ray.remote(num_cpus=0, runtime_env={"env_vars": {"RAY_TMPDIR": sys.argv[1]}})
def ask_state_api(actor_id):
    deadline = time.monotonic() + 90
    while True:  # the dashboard, which serves the state API, may still be starting
        try:
            return get_actor(actor_id, timeout=10).state
        except Exception as error:
            if time.monotonic() > deadline:
                return f"failed: {error}"
            time.sleep(1)

alive = Alive.remote()
print("STATE", ray.get(ask_state_api.remote(ray.get(alive.actor_id.remote()))))
"""


@pytest.mark.slow
@pytest.mark.ray
def test_a_local_rays_processes_ask_their_own_state_api_when_another_cluster_is_recorded(tmp_path: Path) -> None:
    """Ray Train's placement-group cleaner asks the state API whether its controller lives; the state API
    found "the" cluster through /tmp/ray/ray_current_cluster, and asking another cluster there ("no such
    actor") once removed a live run's placement group. Here the record names a cluster that is not ours."""
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text("127.0.0.1:1\n")
    result = subprocess.run([sys.executable, "-c", LOCAL_RAY_ASKS_ITS_OWN_STATE_API, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "STATE ALIVE" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
