"""Tracking (writing): the run, params, the batched metric buffer, artifacts. Every write
goes through delivery.deliver, so an outage of the store spools it (spool.py). Per-iteration
metrics: iteration_logger.py."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import posixpath
import secrets
import shutil
import subprocess
from pathlib import Path

import matplotlib.figure
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from clr_mlflow.tracking import compat, delivery, spool
from clr_mlflow.tracking.history import BOUNDS_TABLE  # noqa: F401 - where callers log it (record.py)

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # how MLflow's UI nests a child run under its parent


def bounded_http_retries() -> None:
    """For applications (the CLI) only, which own their process: bound MLflow's HTTP retries
    through its environment variables (those the user set win), so one call to a store that
    went away fails within seconds. The library never sets them: its writes are bounded by
    delivery's deadline instead."""
    for name, value in delivery.HTTP_RETRY_LIMITS.items():
        os.environ.setdefault(name, value)


_ADJECTIVES = ("amber", "brisk", "calm", "deft", "eager", "fleet", "gentle", "hardy", "keen", "lucid", "merry",
               "nimble", "proud", "quiet", "rapid", "sly", "steady", "tidy", "vivid", "wise")
_NOUNS = ("badger", "crane", "dolphin", "falcon", "gecko", "heron", "ibis", "jaguar", "koala", "lynx", "marten",
          "newt", "otter", "panda", "quail", "raven", "stoat", "tapir", "vole", "wren")


def fresh_run_name() -> str:
    """An adjective-noun-number run name from fresh entropy (`secrets`): MLflow draws its
    names from Python's `random`, which a seeded program has just set, so every run of one
    seed would share a name; `secrets` leaves the caller's `random` state alone."""
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}-{secrets.randbelow(1000)}"


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
    with _ended_by_outcome(started.info.run_id):
        yield started


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
def _ended_by_outcome(run_id: str, remember: bool = True):
    """End `run_id` FINISHED, KILLED (a KeyboardInterrupt: Ctrl-C, or SIGTERM turned into one)
    or FAILED, by id. A store that fails to take the status never replaces the error on its way.
    `remember`: it becomes `last_run_id()` (a child run does not)."""
    global _last_run_id
    if remember:
        _last_run_id = run_id
    try:
        yield
    except BaseException as e:
        try:
            delivery.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        except Exception as store_error:  # noqa: BLE001
            log.warning(f"warning: run {run_id} not marked ended: {store_error}")
        raise
    delivery.end_run(run_id, "FINISHED")


def undelivered(run_id: str) -> Path | None:
    """The spool folder of a run this process wrote, when it still holds something the
    store has not taken (send it with spool.sync); None when all was delivered."""
    return spool.pending_dir(run_id)


def callers_run() -> str | None:
    """The run the calling program logs into: its active run, else the one `mlflow run`
    made for it (MLFLOW_RUN_ID, read, never changed); None when it has none."""
    active = mlflow.active_run()
    return active.info.run_id if active is not None else os.environ.get("MLFLOW_RUN_ID") or None


@contextlib.contextmanager
def run_scope(tags: dict | None = None, params: dict | None = None, taken_by: str | None = None):
    """The library's run for a block: the caller's run (see `callers_run`), or a new run in
    the caller's active experiment, made and ended by id so the caller's active-run stack
    never changes (compat.start_detached_run); it ends when the block does (FAILED if it
    raises). The caller's run gets those of `tags` it lacks. When it cannot take the block's
    writes whole — it already holds the metric `taken_by` (a second lr_find: the steps would
    interleave) or a param of `params` with another value (params are write-once) — the
    block gets a child run of it instead, and says so."""
    tags = _strings(tags or {})
    parent = callers_run()
    why = parent and _why_taken(parent, taken_by, _strings(params or {}))
    if parent is not None and not why:
        delivery.deliver(parent, "tags", {"tags": tags, "missing_only": True})
        yield parent
        return
    if parent is not None:
        experiment = MlflowClient().get_run(parent).info.experiment_id
        run_id = MlflowClient().create_run(experiment, tags=tags | {PARENT_TAG: parent},
                                           run_name=fresh_run_name()).info.run_id
        log.info(f"note: run {parent} {why}; this one logs into its child run {run_id}")
    else:
        run_id = compat.start_detached_run(fresh_run_name(), tags)
    with _ended_by_outcome(run_id):
        yield run_id


@contextlib.contextmanager
def child_run(parent: str, tags: dict | None = None, run_name: str = ""):
    """A new run nested under `parent` (its experiment, tag mlflow.parentRunId), made and
    ended by id, so no active-run stack changes; it ends when the block does (FAILED if it
    raises, KILLED on Ctrl-C). `last_run_id()` stays the parent's."""
    experiment = MlflowClient().get_run(parent).info.experiment_id
    run_id = MlflowClient().create_run(experiment, tags=_strings(tags or {}) | {PARENT_TAG: parent},
                                       run_name=run_name or fresh_run_name()).info.run_id
    with _ended_by_outcome(run_id, remember=False):
        yield run_id


def _why_taken(run_id: str, metric: str | None, params: dict[str, str]) -> str | None:
    """Why `run_id` cannot take a block that logs `metric` and `params`; None when it can, or
    when the store is away (the block logs into the run and its writes are spooled)."""
    try:
        data = delivery.within(delivery.WRITE_DEADLINE, lambda: MlflowClient().get_run(run_id).data)
    except Exception as e:  # noqa: BLE001
        if delivery.is_outage(e):
            return None
        raise
    if metric and metric in data.metrics:
        return f"already has {metric}"
    clash = sorted(k for k, v in params.items() if k in data.params and data.params[k] != v)
    if clash:
        return f"already has param {clash[0]}={data.params[clash[0]]!r} (this one: {params[clash[0]]!r})"
    return None


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
    from clr_mlflow.version import __version__

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

def _run(run_id: str | None) -> str:
    """`run_id`, else the active run's."""
    if run_id:
        return run_id
    run = mlflow.active_run()
    if run is None:
        raise ValueError("Expected run_id or an active MLflow run (mlflow.start_run()), but there is none")
    return run.info.run_id


def _strings(values: dict) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


def log_params(params: dict, run_id: str | None = None) -> None:
    """Log params not yet in the run. `mlflow run` has already logged its entry point's
    parameters as the user typed them ("10" where we would write "10.0"); those stay."""
    delivery.deliver(_run(run_id), "params", {"params": _strings(params)})


def log_metrics(values: dict[str, float], run_id: str | None = None) -> None:
    run_id, ts = _run(run_id), delivery.now_ms()
    metrics = [Metric(k, float(v), ts, 0) for k, v in values.items()]
    chunk = [(ts, np.zeros(1, dtype=np.int64), {k: np.array([float(v)]) for k, v in values.items()})]
    delivery.deliver(run_id, "metrics", {"keys": spool.encode_metrics(chunk)},
                     send=lambda: MlflowClient().log_batch(run_id, metrics=metrics, synchronous=True))


def set_tags(tags: dict[str, str], run_id: str | None = None) -> None:
    delivery.deliver(_run(run_id), "tags", {"tags": _strings(tags), "missing_only": False})


def _deliver_file(path: str, write, kind: str = "artifact", send=None, run_id: str | None = None) -> None:
    """An artifact at run-relative `path`, made by `write(local_file)` where it is needed: a
    temporary folder for the first try, the spool when the store is away."""
    name = posixpath.basename(path)
    delivery.deliver(_run(run_id), kind, {"file": name, "path": path},
                     stage=lambda folder: write(folder / name), send=send)


def log_figure(fig: matplotlib.figure.Figure, path: str, run_id: str | None = None) -> None:
    """A figure as a PNG artifact, saved as it was drawn, never shown. Our figures are made
    without pyplot (plots.py), so there is nothing to close and no backend involved."""
    _deliver_file(path, fig.savefig, run_id=run_id)


def log_frame_csv(df: pd.DataFrame, path: str, run_id: str | None = None) -> None:
    _deliver_file(path, lambda file: file.write_text(df.to_csv(index=False), encoding="utf-8"), run_id=run_id)


def log_artifact_file(local_path: str | Path, artifact_dir: str, run_id: str | None = None) -> None:
    """Copy a local file into the run's artifacts, under `artifact_dir`."""
    run_id = _run(run_id)
    _deliver_file(posixpath.join(artifact_dir, Path(local_path).name), lambda file: shutil.copy2(local_path, file),
                  send=lambda: MlflowClient().log_artifact(run_id, str(local_path), artifact_dir), run_id=run_id)


def log_table(table: pd.DataFrame, path: str, run_id: str | None = None) -> None:
    """A table the UI shows (MLflow's log_table file and tag); a second call replaces the
    file (mlflow.log_table appends rows), so that a replay is idempotent."""
    _deliver_file(path, lambda file: table.to_json(file, orient="split", index=False, date_format="iso"),
                  kind="table", run_id=run_id)


def delete_run(run_id: str) -> None:
    MlflowClient().delete_run(run_id)


_last_run_id: str | None = None


def last_run_id() -> str | None:
    """The run this process made last (also after it ended), without asking the store."""
    return _last_run_id


def store_problem(timeout: float = 10.0) -> str | None:
    """Why the configured store cannot be read now (a server that does not answer, a SQLite
    file that is not there), or None; creates nothing."""
    return delivery.unreachable(mlflow.get_tracking_uri(), timeout)


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
