"""Fixtures: small datasets in their real on-disk layouts, generated here from a few lines each."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_face_jpeg(path: Path, seed: int, size: tuple[int, int] = (64, 64)) -> Path:
    """A small random-but-seeded RGB JPEG (content does not matter to the readers)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85)
    return path


def jpeg_bytes(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


UTK_LABELS = [(age, gender, race) for age, gender, race in zip(range(1, 91, 3), [0, 1] * 15, [0, 1, 2, 3, 4] * 6)]


@pytest.fixture
def utkface_dir(tmp_path: Path) -> Path:
    """30 UTKFace-named files: age_gender_race_datetime.jpg.chip.jpg (UTKFace gender 0 = male)."""
    root = tmp_path / "UTKFace"
    for index, (age, gender, race) in enumerate(UTK_LABELS):
        write_face_jpeg(root / f"{age}_{gender}_{race}_2017010{index:02d}1234567.jpg.chip.jpg", seed=index)
    return root


@pytest.fixture
def fer_csv(tmp_path: Path) -> Path:
    """A 20-row FER2013 csv: emotion, 2304 grey values, Usage."""
    path = tmp_path / "fer2013.csv"
    rng = np.random.default_rng(0)
    usages = ["Training"] * 14 + ["PublicTest"] * 3 + ["PrivateTest"] * 3
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["emotion", "pixels", "Usage"])
        for row in range(20):
            pixels = " ".join(str(v) for v in rng.integers(0, 256, 48 * 48))
            writer.writerow([row % 7, pixels, usages[row]])
    return path


@pytest.fixture
def fer_folders(tmp_path: Path) -> Path:
    """The folder-per-class FER2013 layout: train/<emotion>/*.png and test/<emotion>/*.png."""
    root = tmp_path / "fer2013"
    for split, count in (("train", 3), ("test", 1)):
        for emotion in ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"):
            for index in range(count):
                folder = root / split / emotion
                folder.mkdir(parents=True, exist_ok=True)
                grey = np.full((48, 48), 30 * index + 10, dtype=np.uint8)
                Image.fromarray(grey, mode="L").save(folder / f"im{index}.png")
    return root


CELEBA_ATTRIBUTES = ["5_o_Clock_Shadow", "Male", "Smiling", "Young", "Wearing_Hat"]


@pytest.fixture
def celeba_dir(tmp_path: Path) -> Path:
    """img_align_celeba/ + list_attr_celeba.txt + list_eval_partition.txt + landmarks, 12 images."""
    root = tmp_path / "celeba"
    rows, partition, landmarks = [], [], []
    for index in range(1, 13):
        name = f"{index:06d}.jpg"
        write_face_jpeg(root / "img_align_celeba" / name, seed=index, size=(178, 218))
        values = [1 if (index + col) % 2 else -1 for col in range(len(CELEBA_ATTRIBUTES))]
        rows.append(f"{name} " + " ".join(f"{v:2d}" for v in values))
        partition.append(f"{name} {0 if index <= 8 else 1 if index <= 10 else 2}")
        landmarks.append(f"{name} " + " ".join(str(60 + index + k) for k in range(10)))
    (root / "list_attr_celeba.txt").write_text(
        f"{len(rows)}\n" + " ".join(CELEBA_ATTRIBUTES) + "\n" + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    header = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    (root / "list_landmarks_align_celeba.txt").write_text(f"{len(rows)}\n{header}\n" + "\n".join(landmarks) + "\n")
    return root


@pytest.fixture
def chalearn_dir(tmp_path: Path) -> Path:
    """ChaLearn LAP 2016 layout: train_gt.csv / valid_gt.csv with image name, mean age, std."""
    root = tmp_path / "chalearn"
    for folder, count in (("train", 6), ("valid", 3)):
        lines = ["image,mean,stdv"]
        for index in range(count):
            name = f"{index:06d}.jpg"
            write_face_jpeg(root / folder / name, seed=index + 100)
            lines.append(f"{name},{20.5 + index},{3.25 + index / 10}")
        (root / f"{folder}_gt.csv").write_text("\n".join(lines) + "\n")
    return root


def requires_shared_data(*relative: str):
    """Skip (with the reason) when ../shared/data or the named file is absent, as on a user's machine."""
    missing = [name for name in relative if not (SHARED_DATA / name).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"real data not available: {SHARED_DATA}/{missing}")


# Tests that start a Ray cluster or use the SLURM test cluster run one after another in one pytest-xdist
# process: two local Rays at once would share /tmp/ray's record of the current cluster, which some of these
# tests check, and the SLURM nodes have CPUs for one job at a time. Everything else is spread freely.
CLUSTER_FIXTURES = {"local_ray", "finished_search", "slurm_cluster"}
# Ray runs its workers at niceness 15 (its worker_niceness setting, read from this variable): next to the other
# pytest process's CPU-bound tests, the Ray tests, the suite's critical path, got a fraction of a core.
os.environ.setdefault("RAY_worker_niceness", "0")
# Two pytest processes, their Ray workers and loaders share 2 cores: an OpenMP thread waiting for work spins a
# while by default, burning CPU another process needs. Passive waiting is read when torch loads (hence here,
# before any test module imports torch; Ray workers, SLURM jobs and subprocesses inherit it): the suite took 13.7
# minutes instead of 20.2 (bench/omp_wait_policy.py for the step itself).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marked as each test is collected: pytest-xdist reads the groups in its own collection_modifyitems."""
    uses_cluster = CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ()))
    if uses_cluster or item.get_closest_marker("ray") or item.get_closest_marker("slurm"):
        item.add_marker(pytest.mark.xdist_group("cluster"))


@pytest.fixture(autouse=True)
def _plain_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests are not a terminal: progress is printed as plain lines."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True)
def _builtin_tasks_only():
    """Tasks a test declares (a tasks file, a shard folder) are known to that test only."""
    from pipeline.schema import forget_declared_tasks

    yield
    forget_declared_tasks()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray started as pipeline.train starts it (its dashboard, the cleaner asking this cluster), with
    6 CPUs so that two workers with loader processes fit; a Ray an earlier test left behind is shut first."""
    import ray

    from pipeline.train import connect_ray

    ray.shutdown()
    connect_ray(6)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A real one-node SLURM on this machine (tests/slurm/up.sh). Skipped with the reason where it cannot
    run (not root, not Debian); in CI (CI=true) a failure to start it fails the tests instead."""
    import shutil
    import subprocess

    reason = None
    if os.geteuid() != 0:
        reason = "the SLURM test cluster needs root"
    elif shutil.which("apt-get") is None and shutil.which("sbatch") is None:
        reason = "the SLURM test cluster needs Debian's slurm-wlm (apt-get)"
    else:
        script = Path(__file__).parent / "slurm" / "up.sh"
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            reason = (
                f"tests/slurm/up.sh exited {result.returncode}:\n"
                f"stdout: {result.stdout[-2000:] or '(nothing)'}\nstderr: {result.stderr[-2000:] or '(nothing)'}"
            )
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> dict[str, Path]:
    """Three small synthetic shard sets with the label coverage of UTKFace, FER2013 and CelebA (32 px)."""
    from pipeline.shard import main as shard_main

    root = tmp_path_factory.mktemp("shards")
    layouts = {"utk": ("age,gender,race", 360, 1), "fer": ("emotion", 240, 2), "celeba": ("gender,smile,young", 240, 3)}
    folders = {}
    for name, (tasks, count, seed) in layouts.items():
        folders[name] = root / name
        code = shard_main(["synthetic", "--name", name, "--tasks", tasks, "--num-samples", str(count),
                           "--seed", str(seed), "--size", "32", "--samples-per-shard", "50",
                           "--out", str(folders[name])])
        assert code == 0
    return folders


@pytest.fixture
def one_torch_thread():
    """In-process training on one intra-op thread, as Ray gives its workers: on the shared 2-core test
    machine two threads contending with other processes make each step about ten times slower."""
    from pipeline.align import one_torch_thread as single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def finished_search(synthetic_shards, tmp_path_factory) -> Path:
    """A real, finished ``python -m tune.search`` on the synthetic shards: 4 trials of up to 3 epochs, ASHA
    (grace 1, factor 2), one trial at a time, seed 0. Shared by the dashboard and report tests."""
    import subprocess
    import sys

    from tests.test_train import tiny_overrides

    runs = tmp_path_factory.mktemp("search-runs")
    training = tiny_overrides(synthetic_shards, runs, "unused", "max_epochs=3", "data.loader_workers=0")
    search = ["--num-samples", "4", "--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "2",
              "--max-concurrent", "1", "--seed", "0", "--name", "finished", "--runs-dir", str(runs)]
    result = subprocess.run([sys.executable, "-m", "tune.search", *training, *search], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs / "finished"
