"""Tracking (writing): the run, params, the batched metric buffer, artifacts. Every write
goes through delivery.deliver, so an outage of the store spools it (spool.py). Per-iteration
metrics: iteration_logger.py."""
from __future__ import annotations

import contextlib
import os
import platform
import posixpath
import random
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from clr_mlflow.tracking import delivery
from clr_mlflow.tracking import spool

BOUNDS_TABLE = "range_test/bounds.json"


def bounded_http_retries() -> None:
    """Bound MLflow's HTTP retries (variables the user set win), so that one call to a
    store that went away fails within seconds and the spool takes over."""
    for name, value in delivery.HTTP_RETRY_LIMITS.items():
        os.environ.setdefault(name, value)


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
            _set_experiment(experiment)
            run_name = run_name or fresh_run_name()
        started = mlflow.start_run(run_name=run_name or None, tags=tags, log_system_metrics=system_metrics)
    with _ended_by_outcome(started) as run:
        yield run


def _set_experiment(name: str) -> None:
    """Make `name` the active experiment, creating it if needed. MLflow's set_experiment,
    when another process creates the same experiment between its lookup and its create,
    returns without making it active, so the run would land in Default: create it here,
    take the loser's "already exists" as success, then set the one that exists."""
    client = MlflowClient()
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name)
        except mlflow.MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(name)


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
def run_scope(tags: dict | None = None, taken_by: str | None = None):
    """The active run's id, or a new run (in the active experiment) for the block, ended
    when it ends (FAILED if it raises). An active run gets those of `tags` it lacks.
    `taken_by`: a metric whose presence in the active run means an earlier block already
    logged there (a second lr_find: its steps would interleave with the first's and its
    params clash), so the block gets a child run of the active run instead."""
    run = mlflow.active_run()
    if run is not None and not (taken_by and _has_metric(run.info.run_id, taken_by)):
        delivery.deliver(run.info.run_id, "tags", {"tags": _strings(tags or {}), "missing_only": True})
        yield run.info.run_id
        return
    with _ended_by_outcome(mlflow.start_run(run_name=fresh_run_name(), tags=tags, nested=run is not None)) as child:
        if run is not None:
            print(f"note: run {run.info.run_id} already has {taken_by}; this one logs into its child run "
                  f"{child.info.run_id}", file=sys.stderr)
        yield child.info.run_id


def _has_metric(run_id: str, key: str) -> bool:
    """Whether the run has logged `key`; with the store away, False (the block logs into the
    run and its writes are spooled, as they would be without the question)."""
    try:
        return key in MlflowClient().get_run(run_id).data.metrics
    except Exception as e:  # noqa: BLE001
        if delivery.is_outage(e):
            return False
        raise


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
    from clr_mlflow import __version__

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
