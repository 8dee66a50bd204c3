"""Tracking (writing): the run, params, the batched metric buffer, artifacts. Every write
goes through delivery.deliver, so an outage of the store spools it (spool.py)."""
from __future__ import annotations

import contextlib
import os
import platform
import posixpath
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib.figure
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from . import delivery, spool

BOUNDS_TABLE = "range_test/bounds.json"
RETRY_FIRST, RETRY_CAP = 0.5, 5.0  # the writer's backoff between tries of one chunk (seconds)


def bounded_http_retries() -> None:
    """Bound MLflow's HTTP retries (variables the user set win), so that one call to a
    store that went away fails within seconds and the spool takes over."""
    for name, value in delivery.HTTP_RETRY_LIMITS.items():
        os.environ.setdefault(name, value)


class IterationLogger:
    """Per-iteration metrics for any training loop, at near-zero cost to the loop.

    `log(step, lr=..., loss=...)` takes floats or 0-dim tensors; tensors stay where they are
    (on the GPU too) and are copied to the host together every `sync_every` calls, so the
    loop does not wait for the device. Values are stored by one background thread with
    `log_batch` calls of about `flush_every` values (MLflow costs ~9 ms a `log_metric`
    call, ~0.25 ms a value in a batch); the buffer also flushes every `flush_seconds`.
    `series`/`points` take whole arrays (what our loops report). Only steps that are
    multiples of `log_every` are kept by `log` and `series`; `points` keeps everything.

    Every chunk is appended to the run's local spool (spool.py) as it leaves the buffer,
    before it is sent, so a SIGKILL loses at most the last `flush_seconds`. A write that
    fails because the store is away is retried (backoff 0.5 s doubling to 5 s, chunks in
    order) for as long as the logger is open; the loop never waits for it.

    A context manager: leaving it, normally, by an exception or by Ctrl-C, sends the rest
    and waits up to `close_timeout` seconds until MLflow has stored it; what the store has
    not taken by then stays in the spool (`clr-mlflow sync` sends it). A write the store
    refuses is raised there, unless another error is already on its way out (that error is
    the one that matters; the write's is printed).

        with IterationLogger(prefix="train/") as log:
            for step, batch in enumerate(loader):
                ...
                log.log(step, lr=scheduler.get_last_lr()[0], loss=loss)
    """

    def __init__(self, run_id: str | None = None, prefix: str = "", log_every: int = 1, *,
                 flush_every: int = 3000, flush_seconds: float = 5.0, sync_every: int = 64,
                 client: MlflowClient | None = None, close_timeout: float = 10.0):
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise ValueError("Expected run_id or an active MLflow run (mlflow.start_run()), but there is none")
            run_id = active.info.run_id
        if not (isinstance(log_every, int) and log_every >= 1):
            raise ValueError(f"Expected positive integer log_every, but got {log_every!r}")
        self.run_id, self.prefix, self.log_every = run_id, prefix, log_every
        self.flush_every, self.flush_seconds, self.sync_every = flush_every, flush_seconds, sync_every
        self.client, self.close_timeout = client or MlflowClient(), close_timeout
        self.pending: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []
        self.pending_values = 0
        self.logged: dict[str, tuple[list[int], list]] = {}  # from log(): values maybe still on a device
        self.logged_calls = 0
        self.last_flush = time.monotonic()
        self.calls = 0
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped = threading.Event()
        self.refused: BaseException | None = None  # the first write the store refused
        self.closed = False
        # Made here, not in the loop: the spool's folder and lock cost ~10 ms of file system
        # work once, and the thread's start hands it the GIL for a switch interval (5 ms).
        self.spool = spool.acquire(run_id, self.client.tracking_uri, holder=True)
        self.spool.open()
        # A daemon thread, not an executor: one stuck in a call to a dead server must not
        # hold the process at exit (what it holds is in the spool).
        self.writer = threading.Thread(target=self._write_all, name="clr_mlflow-metrics", daemon=True)
        self.writer.start()

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
            # Journaled before the buffer lets go of it: a Ctrl-C between the two leaves it in
            # both (replays skip points the store has), never in neither.
            token = self.spool.append_metrics(self.pending)  # on disk before it is sent: SIGKILL-proof
            chunks, self.pending, self.pending_values = self.pending, [], 0
            self.queue.put((chunks, token))
            self.calls += 1

    def _write_all(self) -> None:
        while (item := self.queue.get()) is not None and not self.stopped.is_set():
            self._write(*item)

    def _write(self, chunks, token: int) -> None:
        metrics = [Metric(key, v, ts, s) for ts, steps, values in chunks for key, vals in values.items()
                   for s, v in zip(steps.tolist(), vals.tolist())]
        delay = RETRY_FIRST
        while not self.stopped.is_set():
            try:
                self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
            except Exception as e:  # noqa: BLE001 - kept in the spool either way
                if not delivery.is_outage(e):
                    self.refused = self.refused or e
                    return
                self.spool.went_away(e)
                self.stopped.wait(delay)  # SQL stores keep one row per (key, timestamp, step, value)
                delay = min(2 * delay, RETRY_CAP)
            else:
                self.spool.delivered(token)
                return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._sync_logged()
        finally:  # what is on the host already is sent even when the device copy fails
            self.flush()
        self.queue.put(None)
        self.writer.join(self.close_timeout)
        self.stopped.set()  # a writer still trying gives up; its chunks are in the spool
        if self.writer.is_alive() or self.spool.in_flight:
            print(f"warning: run {self.run_id}: the tracking store has not taken every value after "
                  f"{self.close_timeout:g} s; they are kept in {self.spool.dir}", file=sys.stderr)
        self.spool.release(holder=True)
        if self.refused is not None:
            raise self.refused

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
    one `mlflow run` made (MLFLOW_RUN_ID), else a new one in `experiment`. It ends KILLED
    when a KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one) leaves the body, FAILED on
    any other error. `system_metrics`: MLflow samples CPU, memory, disk, network (and GPU)
    use into `system/*` while the run is open."""
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
    global _last_run_id
    _last_run_id = run.info.run_id
    try:
        yield run
    except BaseException as e:
        try:
            delivery.end_run(run.info.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        except Exception as store_error:  # noqa: BLE001
            print(f"warning: run {run.info.run_id} not marked ended: {store_error}", file=sys.stderr)
        raise
    delivery.end_run(run.info.run_id, "FINISHED")


def undelivered(run_id: str) -> Path | None:
    """The spool folder of a run this process wrote, when it still holds something the
    store has not taken (send it with spool.sync); None when all was delivered."""
    return spool.pending_dir(run_id)


@contextlib.contextmanager
def run_scope(tags: dict | None = None):
    """The active run's id, or a new run (in the active experiment) for the block, ended
    when it ends (FAILED if it raises). An active run gets those of `tags` it lacks."""
    run = mlflow.active_run()
    if run is not None:
        delivery.deliver(run.info.run_id, "tags", {"tags": _strings(tags or {}), "missing_only": True})
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
    from . import __version__

    return {
        "clr_mlflow.version": __version__,
        "clr_mlflow.git_commit": git_commit(),
        "clr_mlflow.python": platform.python_version(),
        "clr_mlflow.torch": torch.__version__,
        "clr_mlflow.mlflow": mlflow.__version__,
        "clr_mlflow.device": device,
    }


# Every write below goes through delivery.deliver: tried once (bounded), journaled once the
# store is away for the run; the replayers in delivery.py are the writes themselves.

def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise ValueError("Expected an active MLflow run (mlflow.start_run()), but there is none")
    return run.info.run_id


def _strings(values: dict) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


def log_params(params: dict) -> None:
    """Log params not yet in the run. `mlflow run` has already logged its entry point's
    parameters as the user typed them ("10" where we would write "10.0"); those stay."""
    delivery.deliver(_active_run_id(), "params", {"params": _strings(params)})


def log_metrics(values: dict[str, float]) -> None:
    run_id, ts = _active_run_id(), delivery.now_ms()
    metrics = [Metric(k, float(v), ts, 0) for k, v in values.items()]
    chunk = [(ts, np.zeros(1, dtype=np.int64), {k: np.array([float(v)]) for k, v in values.items()})]
    delivery.deliver(run_id, "metrics", {"keys": spool.encode_metrics(chunk)},
                     send=lambda: MlflowClient().log_batch(run_id, metrics=metrics, synchronous=True))


def set_tags(tags: dict[str, str], run_id: str | None = None) -> None:
    delivery.deliver(run_id or _active_run_id(), "tags", {"tags": _strings(tags), "missing_only": False})


def _deliver_file(path: str, write, kind: str = "artifact", send=None) -> None:
    """An artifact at run-relative `path`, made by `write(local_file)` where it is needed: a
    temporary folder for the first try, the spool when the store is away."""
    name = posixpath.basename(path)
    delivery.deliver(_active_run_id(), kind, {"file": name, "path": path},
                     stage=lambda folder: write(folder / name), send=send)


def log_figure(fig: matplotlib.figure.Figure, path: str) -> None:
    import matplotlib.pyplot as plt

    try:
        _deliver_file(path, fig.savefig)
    finally:
        plt.close(fig)


def log_frame_csv(df: pd.DataFrame, path: str) -> None:
    _deliver_file(path, lambda file: file.write_text(df.to_csv(index=False), encoding="utf-8"))


def log_artifact_file(local_path: str | Path, artifact_dir: str) -> None:
    """Copy a local file into the active run's artifacts, under `artifact_dir`."""
    run_id = _active_run_id()
    _deliver_file(posixpath.join(artifact_dir, Path(local_path).name), lambda file: shutil.copy2(local_path, file),
                  send=lambda: MlflowClient().log_artifact(run_id, str(local_path), artifact_dir))


def log_table(table: pd.DataFrame, path: str) -> None:
    """A table the UI shows (MLflow's log_table file and tag); a second call replaces the
    file (mlflow.log_table appends rows), so that a replay is idempotent."""
    _deliver_file(path, lambda file: table.to_json(file, orient="split", index=False, date_format="iso"),
                  kind="table")


def delete_run(run_id: str) -> None:
    MlflowClient().delete_run(run_id)


_last_run_id: str | None = None


def last_run_id() -> str | None:
    """The run this process made last (also after it ended), without asking the store."""
    return _last_run_id


class StoreError(ValueError):
    """The tracking store cannot be used: one line saying why."""


def check_store(experiment: str | None, timeout: float = 10.0) -> None:
    """Before any data is loaded: a tracking server must answer within `timeout` seconds; a
    new SQLite file gets its schema under a file lock, so processes starting together on a
    fresh file do not each try to create it (MLflow's migrations break the file then); the
    experiment must not be a deleted one."""
    uri = mlflow.get_tracking_uri()
    why = delivery.unreachable(uri, timeout) if uri.startswith(("http://", "https://")) else None
    if why:
        raise StoreError(why)
    if uri.startswith("sqlite:///"):
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
