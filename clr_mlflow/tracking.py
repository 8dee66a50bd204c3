"""The only module that talks to MLflow: the run, params, the batched metric buffer, artifacts."""
from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.figure
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

BOUNDS_TABLE = "range_test/bounds.json"


class IterationLogger:
    """Per-iteration metrics for any training loop, at near-zero cost to the loop.

    `log(step, lr=..., loss=...)` takes floats or 0-dim tensors; tensors stay where they are
    (on the GPU too) and are copied to the host together every `sync_every` calls, so the
    loop does not wait for the device. Values are stored by one background thread with
    `log_batch` calls of about `flush_every` values (MLflow costs ~9 ms a `log_metric`
    call, ~0.25 ms a value in a batch); the buffer also flushes every `flush_seconds`.
    `series`/`points` take whole arrays (what our loops report). Only steps that are
    multiples of `log_every` are kept by `log` and `series`; `points` keeps everything.

    A context manager: leaving it, normally, by an exception or by Ctrl-C, sends the rest
    and waits until MLflow has stored it. A failed write is raised there, unless another
    error is already on its way out (that error is the one that matters; the write's is
    printed).

        with IterationLogger(prefix="train/") as log:
            for step, batch in enumerate(loader):
                ...
                log.log(step, lr=scheduler.get_last_lr()[0], loss=loss)
    """

    def __init__(self, run_id: str | None = None, prefix: str = "", log_every: int = 1, *,
                 flush_every: int = 3000, flush_seconds: float = 5.0, sync_every: int = 64,
                 client: MlflowClient | None = None):
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise ValueError("Expected run_id or an active MLflow run (mlflow.start_run()), but there is none")
            run_id = active.info.run_id
        if not (isinstance(log_every, int) and log_every >= 1):
            raise ValueError(f"Expected positive integer log_every, but got {log_every!r}")
        self.run_id, self.prefix, self.log_every = run_id, prefix, log_every
        self.flush_every, self.flush_seconds, self.sync_every = flush_every, flush_seconds, sync_every
        self.client = client or MlflowClient()
        self.pending: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []
        self.pending_values = 0
        self.logged: dict[str, tuple[list[int], list]] = {}  # from log(): values maybe still on a device
        self.logged_calls = 0
        self.last_flush = time.monotonic()
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clr_mlflow-metrics")
        self.in_flight = []
        self.calls = 0

    def log(self, step: int, **values) -> None:
        """Record `values` (floats or 0-dim tensors) at `step`, under `prefix`."""
        if step % self.log_every:
            return
        for key, value in values.items():
            steps, vals = self.logged.setdefault(self.prefix + key, ([], []))
            steps.append(step)
            vals.append(value.detach() if isinstance(value, torch.Tensor) else value)
        self.logged_calls += 1
        if self.logged_calls >= self.sync_every or time.monotonic() - self.last_flush > self.flush_seconds:
            self._sync_logged()

    def _sync_logged(self) -> None:
        """Bring logged tensors to the host: one transfer per key, not per value."""
        for key, (steps, vals) in self.logged.items():
            out = np.empty(len(vals))
            at = [i for i, v in enumerate(vals) if isinstance(v, torch.Tensor)]
            if at:
                out[at] = torch.stack([vals[i].float().reshape(()) for i in at]).cpu().numpy()
            rest = [i for i, v in enumerate(vals) if not isinstance(v, torch.Tensor)]
            out[rest] = [float(vals[i]) for i in rest]
            self.points(steps, {key: out})
        self.logged, self.logged_calls = {}, 0

    def series(self, steps, values: dict) -> None:
        if self.log_every > 1:
            keep = np.asarray(steps) % self.log_every == 0
            steps, values = np.asarray(steps)[keep], {k: np.asarray(v)[keep] for k, v in values.items()}
        self.points(steps, values)

    def points(self, steps, values: dict) -> None:
        steps = np.array(steps, dtype=np.int64)
        if len(steps):
            self.pending.append((int(time.time() * 1000), steps, {k: np.array(v, dtype=float) for k, v in values.items()}))
            self.pending_values += len(steps) * len(values)
        if self.pending_values >= self.flush_every or time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if self.pending:
            self.in_flight.append(self.writer.submit(self._write, self.pending))
            self.calls += 1
            self.pending, self.pending_values = [], 0

    def _write(self, chunks) -> None:
        metrics = [Metric(key, v, ts, s) for ts, steps, values in chunks for key, vals in values.items()
                   for s, v in zip(steps.tolist(), vals.tolist())]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def close(self) -> None:
        try:
            self._sync_logged()
        finally:  # what is on the host already is sent even when the device copy fails
            self.flush()
        in_flight, self.in_flight = self.in_flight, []
        try:
            for future in in_flight:
                future.result()
        finally:
            self.writer.shutdown(wait=True)

    def __enter__(self) -> "IterationLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as write_error:  # noqa: BLE001 - keep the error that ended the loop
            print(f"warning: metrics not stored ({write_error}); the run ended with {exc_type.__name__}",
                  file=sys.stderr)


def fresh_run_name() -> str:
    """MLflow's adjective-noun-number name, drawn from fresh entropy: MLflow draws it from
    Python's `random`, which our seed has just set, so every run of a seed would share one
    name. The seeded state is put back untouched."""
    from mlflow.utils.name_utils import _generate_random_name

    state = random.getstate()
    random.seed()
    try:
        return _generate_random_name()
    finally:
        random.setstate(state)


@contextlib.contextmanager
def active_run(experiment: str, run_name: str = "", tags: dict | None = None, system_metrics: bool = False,
               run_id: str | None = None):
    """The run to log into: `run_id` (an existing run, reopened: status RUNNING again), the
    one `mlflow run` made (MLFLOW_RUN_ID), else a new one in `experiment`. It ends KILLED when a KeyboardInterrupt (Ctrl-C, or SIGTERM turned into
    one) leaves the body, FAILED on any other error. `system_metrics`: MLflow samples CPU,
    memory, disk, network (and GPU) use into `system/*` while the run is open."""
    if run_id:
        started = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
    else:
        if not os.environ.get("MLFLOW_RUN_ID"):
            mlflow.set_experiment(experiment)
            run_name = run_name or fresh_run_name()
        started = mlflow.start_run(run_name=run_name or None, tags=tags, log_system_metrics=system_metrics)
    with _ended_by_outcome(started) as run:
        yield run


@contextlib.contextmanager
def _ended_by_outcome(run):
    """End `run` FINISHED, KILLED (a KeyboardInterrupt: Ctrl-C, or SIGTERM turned into one)
    or FAILED. A store that fails to take the status never replaces the error on its way."""
    try:
        yield run
    except BaseException as e:
        try:
            mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        except Exception as store_error:  # noqa: BLE001
            print(f"warning: run {run.info.run_id} not marked ended: {store_error}", file=sys.stderr)
        raise
    mlflow.end_run("FINISHED")


@contextlib.contextmanager
def run_scope(tags: dict | None = None):
    """The active run's id, or a new run (in the active experiment) for the block, ended
    when it ends (FAILED if it raises). An active run gets those of `tags` it lacks."""
    run = mlflow.active_run()
    if run is not None:
        present = MlflowClient().get_run(run.info.run_id).data.tags
        mlflow.set_tags({k: v for k, v in (tags or {}).items() if k not in present})
        yield run.info.run_id
        return
    with _ended_by_outcome(mlflow.start_run(run_name=fresh_run_name(), tags=tags)) as run:
        yield run.info.run_id


def git_commit() -> str:
    """Commit of the clr_mlflow source tree, when it is a git checkout ('' otherwise)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")) if out.returncode == 0 else ""


def provenance_tags(device: str) -> dict[str, str]:
    import torch

    from . import __version__

    return {
        "clr_mlflow.version": __version__,
        "clr_mlflow.git_commit": git_commit(),
        "clr_mlflow.python": platform.python_version(),
        "clr_mlflow.torch": torch.__version__,
        "clr_mlflow.mlflow": mlflow.__version__,
        "clr_mlflow.device": device,
    }


def log_params(params: dict) -> None:
    """Log params not yet in the run. `mlflow run` has already logged its entry point's
    parameters as the user typed them ("10" where we would write "10.0"); those stay."""
    run = mlflow.active_run()
    present = MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in present})


def log_metrics(values: dict[str, float]) -> None:
    mlflow.log_metrics(values)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_figure(fig: matplotlib.figure.Figure, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, path)
    plt.close(fig)


def log_frame_csv(df: pd.DataFrame, path: str) -> None:
    mlflow.log_text(df.to_csv(index=False), path)


def log_artifact_file(local_path: str | Path, artifact_dir: str) -> None:
    """Copy a local file into the active run's artifacts, under `artifact_dir`."""
    mlflow.log_artifact(str(local_path), artifact_dir)


def log_table(table: pd.DataFrame, path: str) -> None:
    mlflow.log_table(table, artifact_file=path)


def delete_run(run_id: str) -> None:
    MlflowClient().delete_run(run_id)


def last_run_id() -> str | None:
    """The run this process made last (also after it ended)."""
    run = mlflow.last_active_run()
    return run.info.run_id if run else None


class StoreError(ValueError):
    """The tracking store cannot be used: one line saying why."""


def check_store(experiment: str | None, timeout: float = 10.0) -> None:
    """Before any data is loaded: a tracking server must answer within `timeout` seconds; a
    new SQLite file gets its schema under a file lock, so processes starting together on a
    fresh file do not each try to create it (MLflow's migrations break the file then); the
    experiment must not be a deleted one."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
        except requests.RequestException as e:
            raise StoreError(f"Expected a tracking server at {uri}, but it did not answer within {timeout:g} s "
                             f"({type(e).__name__})") from None
    elif uri.startswith("sqlite:///"):
        import fcntl

        path = Path(uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            MlflowClient().search_experiments(max_results=1)  # creates and migrates the schema once
    if experiment and not os.environ.get("MLFLOW_RUN_ID"):
        found = MlflowClient().get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise StoreError(f"Expected experiment to name an active experiment, but {experiment!r} is deleted "
                             "(restore it with `mlflow experiments restore`, or choose another name)")
