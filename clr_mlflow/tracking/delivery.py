"""How every write reaches the tracking store (tracking layer, writing): one mechanism.

`deliver` tries the store once, for at most WRITE_DEADLINE seconds (a call that has not
returned by then is taken as an outage, so a library caller's loop never waits minutes on
MLflow's default HTTP retries and no environment variable needs setting); once the store
is away for the run, the op
goes into the run's spool journal (spool.py) and the caller goes on at once. An op is a
kind and a JSON payload (plus files); its replayer, registered here or in assets.py, is the
write itself, used for the first try and again by `replay` (sync.py, and the end of a
run whose store came back). Replayers are idempotent: a point the store has is not sent
again, params and tags present are skipped, artifacts are overwritten.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from clr_mlflow.tracking import compat, spool
from clr_mlflow.tracking.spool import short
from clr_mlflow.tracking.spool_check import check_entries

log = logging.getLogger(__name__)

WRITE_DEADLINE = 10.0  # seconds one write may take before the store counts as away
# Ops whose writes go to the store by run id (no fluent state), so they can run on a
# deadline thread; "inputs" and "model" use MLflow's fluent API, which is per thread.
BY_ID = {"metrics", "params", "tags", "artifact", "table", "status"}

# One MLflow HTTP call against a dead server: ~3 s (refused), ~35 s at worst (no answer),
# instead of MLflow's default of minutes (7 retries, backoff factor 2, 120 s timeout).
HTTP_RETRY_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Store errors that no retry will cure: the op is wrong (or the run gone), not the store away.
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
             "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "ENDPOINT_NOT_FOUND",
             "NOT_IMPLEMENTED", "FEATURE_DISABLED"}


def is_outage(error: BaseException) -> bool:
    """True when `error` says the store is away (refused connection, timeout, 5xx, a locked
    file): worth retrying or spooling. False when the store refused the op itself."""
    if isinstance(error, MlflowException):
        return error.error_code not in PERMANENT
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # a local file missing or unreadable: no waiting will cure it
    return isinstance(error, (OSError, requests.RequestException))


def refused_or_away(error: BaseException) -> bool:
    return is_outage(error) or isinstance(error, MlflowException)


def unreachable(uri: str, timeout: float = 10.0) -> str | None:
    """Why the store at `uri` cannot be used now (a server that does not answer /health
    within `timeout` seconds, a SQLite file that is not there), or None."""
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
        except requests.RequestException as e:
            return (f"Expected a tracking server at {uri}, but it did not answer within {timeout:g} s "
                    f"({type(e).__name__})")
    elif uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"Expected a SQLite tracking store at {uri}, but there is no such file"
    return None


class StoreTimeout(TimeoutError):
    """A store call that did not return within its deadline: an outage (TimeoutError is an
    OSError, which is_outage counts as one)."""


def within(seconds: float, call: Callable):
    """`call()`'s result, or StoreTimeout when it has not returned within `seconds`. It runs
    on a daemon thread, which is left to finish on its own when late; every replayer is
    idempotent, so a late write that lands after its op was journaled is not doubled."""
    done, result = threading.Event(), {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
            result["error"] = e
        done.set()

    threading.Thread(target=run, name="clr_mlflow-write", daemon=True).start()
    if not done.wait(seconds):
        raise StoreTimeout(f"the tracking store did not answer within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def now_ms() -> int:
    return int(time.time() * 1000)


class Replay:
    """What a replayer gets: the client, the run, where the op's files are, and tallies."""

    def __init__(self, client: MlflowClient, run_id: str, base: Path):
        self.client, self.run_id, self.base = client, run_id, base
        self.values = self.artifacts = 0
        self.last_ts: int | None = None
        self._steps: dict[str, set[int]] = {}

    def folder(self, entry: dict) -> Path:
        return self.base / entry.get("files", "")

    def steps_in_store(self, key: str) -> set[int]:
        if key not in self._steps:
            self._steps[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return self._steps[key]


REPLAYERS: dict[str, Callable[[Replay, dict], None]] = {}


def replayer(kind: str):
    """Register how ops of `kind` reach the store (the first try, and every replay)."""
    def register(fn):
        REPLAYERS[kind] = fn
        return fn
    return register


def deliver(run_id: str, kind: str, payload: dict, stage: Callable[[Path], None] | None = None,
            send: Callable[[], None] | None = None) -> bool:
    """Write one op of `run_id`. Straight to the store unless the store is away for this run
    or earlier ops wait in its journal (order is kept); an outage on the way journals it.
    `stage(folder)` writes the files the op needs (a temporary folder for the first try,
    the spool's when journaled); `send()`, when given, is the first try (it may use live
    objects), else the replayer is. True when the store took it now."""
    pending = spool.get(run_id)
    if pending is not None and pending.waiting and not (pending.away or pending.inherited or pending.stuck):
        _catch_up(pending)
    if pending is None or pending.direct:
        def attempt() -> None:
            if send is not None:
                send()
            else:
                with tempfile.TemporaryDirectory(prefix="clr_mlflow_") as tmp:
                    if stage is not None:
                        stage(Path(tmp))
                    REPLAYERS[kind](Replay(MlflowClient(), run_id, Path(tmp)), payload)
        try:
            within(WRITE_DEADLINE, attempt) if kind in BY_ID else attempt()
            return True
        except Exception as e:
            if not is_outage(e):
                raise
            spool.acquire(run_id).went_away(e)
    spool.acquire(run_id).journal_op(kind, payload, stage)
    return False


def _catch_up(pending: spool.Spool) -> None:
    """The store answers again (the metric writer got through): send the ops that waited in
    the journal, in order, before the next one, so that a short outage does not leave every
    later op (a checkpoint each epoch) to the end of the run."""
    ctx = Replay(MlflowClient(), pending.run_id, pending.dir)
    while pending.waiting and pending.waiting[0]["op"] != "status":
        try:
            REPLAYERS[pending.waiting[0]["op"]](ctx, pending.waiting[0])
        except Exception as e:
            if is_outage(e):
                pending.went_away(e)
            else:
                pending.stuck = True
                log.warning(f"warning: run {pending.run_id}: the store refused a spooled op ({short(e)}); it stays "
                            f"in {pending.dir}")
            return
        pending.waiting.pop(0)


@replayer("metrics")
def _replay_metrics(ctx: Replay, entry: dict) -> None:
    """Only the (key, step) points the store lacks: a replay sends each point once."""
    metrics = []
    for key, (steps, values, ts) in spool.decode_metrics(entry).items():
        present = ctx.steps_in_store(key)
        for s, v, t in zip(steps.tolist(), values.tolist(), ts.tolist()):
            if s not in present:
                metrics.append(Metric(key, v, t, s))
                present.add(s)
        if len(ts):
            ctx.last_ts = max(ctx.last_ts or 0, int(ts.max()))
    if metrics:
        ctx.client.log_batch(ctx.run_id, metrics=metrics, synchronous=True)
        ctx.values += len(metrics)


@replayer("params")
def _replay_params(ctx: Replay, entry: dict) -> None:
    """Params are write-once in MLflow: those present (e.g. `mlflow run`'s) stay."""
    present = ctx.client.get_run(ctx.run_id).data.params
    missing = [Param(k, v) for k, v in entry["params"].items() if k not in present]
    if missing:
        ctx.client.log_batch(ctx.run_id, params=missing, synchronous=True)


@replayer("tags")
def _replay_tags(ctx: Replay, entry: dict) -> None:
    present = ctx.client.get_run(ctx.run_id).data.tags
    new = [RunTag(k, v) for k, v in entry["tags"].items()
           if k not in present or (not entry["missing_only"] and present[k] != v)]
    if new:
        ctx.client.log_batch(ctx.run_id, tags=new, synchronous=True)


@replayer("artifact")
def _replay_artifact(ctx: Replay, entry: dict) -> None:
    ctx.client.log_artifact(ctx.run_id, str(ctx.folder(entry) / entry["file"]),
                            posixpath.dirname(entry["path"]) or None)
    ctx.artifacts += 1


@replayer("table")
def _replay_table(ctx: Replay, entry: dict) -> None:
    """MLflow's log_table file plus the tag that lists it for the UI; unlike log_table,
    which appends rows to a file already there, a replay replaces it."""
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    _replay_artifact(ctx, entry)
    listed = json.loads(ctx.client.get_run(ctx.run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    if {"path": entry["path"], "type": "table"} not in listed:
        listed.append({"path": entry["path"], "type": "table"})
        ctx.client.set_tag(ctx.run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(listed))


@contextlib.contextmanager
def as_active_run(run_id: str):
    """`run_id` as the active run for fluent calls that need one (a Logged Model takes its
    experiment from it); reopening sets it RUNNING, which the replay's last status undoes."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        yield
    finally:
        compat.leave_fluent_run(run_id, "FINISHED")


@contextlib.contextmanager
def _using_tracking_uri(uri: str):
    previous, env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    if previous == uri:
        yield
        return
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def check_journal(folder: Path) -> list[dict]:
    """The journal's entries, each checked (spool_check) before any is sent: SyncError. The
    ops it knows are those whose replayers are registered: here, and in assets.py, which
    sync.py imports (a live process that logged a model has imported it already)."""
    entries = spool.read_journal(folder)
    check_entries(folder, entries, set(REPLAYERS) | {"status"})
    return entries


def replay(folder: Path, run_id: str, uri: str) -> str:
    """Send a spool's journal in order, skipping what the store has; the status last: the
    journal's, else KILLED for a run the store still has RUNNING (its writer died)."""
    entries = check_journal(folder)
    with _using_tracking_uri(uri):
        client = MlflowClient(uri)
        before = client.get_run(run_id).info
        ctx, final = Replay(client, run_id, folder), None
        # An artifact journaled again at the same path (a checkpoint) replaced the earlier
        # one, whose files are gone: only the last is sent.
        last = {(e["op"], e.get("path")): i for i, e in enumerate(entries)}
        for i, entry in enumerate(entries):
            if entry["op"] == "status":
                final = entry
            elif entry["op"] in ("artifact", "table") and last[(entry["op"], entry["path"])] != i:
                continue
            else:
                REPLAYERS[entry["op"]](ctx, entry)
        if final is None:
            final = ({"status": "KILLED", "end_time": ctx.last_ts} if before.status == "RUNNING"
                     else {"status": before.status, "end_time": before.end_time})
        if "op" in final or client.get_run(run_id).info.status != final["status"]:
            client.set_terminated(run_id, final["status"], final.get("end_time"))
    return (f"run {run_id}: {ctx.values} metric values, {ctx.artifacts} artifacts, status {final['status']} "
            f"delivered to {uri}")


def settle(run_id: str) -> Path | None:
    """At the end of a run: when ops wait in its spool and the store answers again, send
    them now; the folder goes once all is delivered. Returns the folder still left."""
    pending = spool.get(run_id)
    if pending is None:
        return None
    if pending.pending and pending.holders == 0 and pending.dir is not None \
            and not unreachable(pending.tracking_uri, 2.0):
        try:
            replay(pending.dir, run_id, pending.tracking_uri)
            pending.all_delivered()
        except Exception as e:  # noqa: BLE001 - it stays in the spool for `sync`
            log.warning(f"warning: run {run_id}: the spool could not be sent yet ({short(e)})")
    pending.release()
    return spool.pending_dir(run_id)


def end_run(run_id: str, status: str) -> None:
    """End the run `run_id`, by id: its status goes the way of every write (journaled when
    the store is away or ops wait ahead of it), what waits is sent now if the store answers
    again, and, when it is this thread's active run (an application's own), it leaves the
    active-run stack whatever the store says. No other run on the stack is touched."""
    end_time, pending = now_ms(), spool.get(run_id)
    try:
        deliver(run_id, "status", {"status": status, "end_time": end_time},
                send=lambda: MlflowClient().set_terminated(run_id, status, end_time))
        left = settle(run_id)
    finally:
        compat.leave_fluent_run(run_id, status)
    pending = pending or spool.get(run_id)  # made by the status itself when the store was away
    if pending is not None and pending.stranded and not pending.stop_raised:  # no loop said it: said here
        log.warning(f"warning: {pending.stranded_line(None)}")
    elif left is not None and not (pending is not None and pending.stop_raised):  # else its line said it
        log.warning(f"warning: run {run_id} ended {status} while the tracking store did not take all of it: the "
                    f"rest is spooled at {left}; send it with `clr-mlflow sync {left}`")
