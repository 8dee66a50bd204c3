from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("CLR_MLFLOW_CIFAR", REPO.parent / "shared" / "data" / "cifar10"))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (a container's share)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _threads_per_process() -> int:
    """The cores this machine gives us, shared among pytest-xdist's workers: two workers
    of two OpenMP threads each on two cores spin against each other (a test then runs
    several times slower)."""
    return max(1, _cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than cores. A worker often waits on another process (a
    server restarting, a child training to its checkpoint); the spare keeps both cores busy."""
    return min(4, _cores() + 1)


# Modules by how long their tests take (--durations, summed), heaviest first. pytest-xdist
# hands whole modules out in collection order (pyproject: loadfile, no reorder): started
# first, the long ones overlap the many short ones instead of running alone at the end while
# the other workers wait. A module not named here goes after these, in its usual order.
HEAVIEST_FIRST = ("test_faults.py", "test_outages.py", "test_sweep.py", "test_project.py", "test_faults2.py",
                  "test_cli_output.py", "test_server.py", "test_spool_trust.py", "test_engine.py", "test_plugins.py",
                  "test_review.py", "test_integrations.py", "test_full_disk.py", "test_integration.py", "test_api.py",
                  "test_distributed.py", "test_tune.py", "test_seeds.py", "test_docstrings.py", "test_embedding.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


def pytest_configure(config):
    """Torch threads in each process that runs tests; child processes (the CLI, `mlflow
    run`, Ray's workers, torchrun) inherit OMP_NUM_THREADS. A value the user set wins."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller runs no test: each worker sets its own
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(_threads_per_process()))
    # Ray trials at the tests' priority (the CLI's sweep does the same; tune_bounds, a library
    # call, leaves Ray's nice 15, under which the other workers' tests starve them for minutes)
    os.environ.setdefault("RAY_worker_niceness", "0")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_EMPTY_STORE: Path | None = None


def empty_store_file() -> Path:
    """A SQLite file holding MLflow's schema and nothing else, made once per test process:
    creating the schema (dozens of migrations, each committed to disk) takes seconds; a copy
    of this file is the same empty store in milliseconds."""
    global _EMPTY_STORE
    if _EMPTY_STORE is None:
        import atexit
        import shutil
        import tempfile

        from mlflow import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="clr_mlflow_empty_store_"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        _EMPTY_STORE = folder / "mlflow.db"
    return _EMPTY_STORE


def use_store(mp: pytest.MonkeyPatch, folder: Path) -> str:
    """Point MLflow, in this process and its children, at a new, empty SQLite store in
    `folder` (its schema made), forgetting any experiment an earlier test made active."""
    import shutil

    shutil.copyfile(empty_store_file(), folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(var, raising=False)
    mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mp.chdir(folder)  # artifacts land in folder/mlruns
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A real, empty SQLite tracking store for one test; yields its URI."""
    yield use_store(monkeypatch, tmp_path)
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def cifar() -> Path:
    """Real CIFAR-10 images in ImageFolder layout: the shared offline copy when it is there,
    else a 4,000 + 1,000 image export of torchvision's download (a fresh online machine)."""
    if (CIFAR / "train").is_dir():
        return CIFAR
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clr_mlflow_tests"
    folder = cache / "cifar10_folder"
    if not (folder / "done").exists():
        from torchvision.datasets import CIFAR10

        for split, train, per_class in (("train", True, 400), ("test", False, 100)):
            ds = CIFAR10(root=str(cache), train=train, download=True)
            seen = np.zeros(10, dtype=int)
            for img, label in zip(ds.data, ds.targets):
                if seen[label] < per_class:
                    out = folder / split / ds.classes[label]
                    out.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img).save(out / f"{seen[label]:04d}.png")
                    seen[label] += 1
        (folder / "done").touch()
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One decode cache for the whole session, so each subset is decoded once."""
    return tmp_path_factory.mktemp("data")


def make_image_folder(root: Path, classes=("a", "b", "c"), per_class=(6, 3), size=12, seed=0) -> Path:
    """A small ImageFolder tree of random PNGs: per_class = (train, test) images per class."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i:03d}.png")
    return root
