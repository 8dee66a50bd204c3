"""Tracking (writing), per iteration: IterationLogger, the batched metric buffer of every
loop. Its chunks go to the run's spool (spool.py) before a background thread sends them."""
from __future__ import annotations

import itertools
import logging
import numbers
import queue
import threading
import time

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from clr_mlflow.tracking import delivery
from clr_mlflow.tracking import spool
from clr_mlflow.core.checks import is_int, need

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_CAP = 0.5, 5.0  # the writer's backoff between tries of one chunk (seconds)


def _check_value(key: str, value) -> None:
    """One number per key and step, refused at the call that logs it (not 64 calls later,
    when the buffer goes to the device and then to MLflow)."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_complex()
        got = f"a tensor of shape {tuple(value.shape)}"
    else:
        ok = isinstance(value, (numbers.Real, np.number)) and not isinstance(value, (bool, np.bool_))
        got = f"{type(value).__name__} {value!r}"[:80]
    if not ok:
        raise ValueError(f"Expected a number or a one-element tensor for IterationLogger.log({key}=...), but got "
                         f"{got}")


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
                raise ValueError("Expected run_id=... or an active MLflow run, but there is none: pass the run's id, "
                                 "e.g. IterationLogger(run_id=trainer.logger.run_id) under Lightning's MLFlowLogger, "
                                 "or log inside `with mlflow.start_run():`")
            run_id = active.info.run_id
        need(is_int(log_every, 1), "log_every", "positive integer", log_every)
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
        # This logger's chunks the store has not taken, by its own chunk number: the spool's
        # in_flight is the run's (shared with the range test's logger, whose leftovers are not
        # this one's to report), and its token is 0 for every chunk when it cannot write.
        self.unsent: set[int] = set()
        self.chunks = itertools.count()
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
            _check_value(key, value)
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
            number = next(self.chunks)
            self.unsent.add(number)
            self.queue.put((chunks, token, number))
            self.calls += 1

    def _write_all(self) -> None:
        while (item := self.queue.get()) is not None and not self.stopped.is_set():
            self._write(*item)

    def _write(self, chunks, token: int, number: int) -> None:
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
                self.unsent.discard(number)
                return

    def close(self) -> None:
        """Send what is buffered, wait up to `close_timeout` for the store, stop the writer
        thread and let go of the spool — all of it also when sending fails on the way (the
        first such error is raised after, never instead of, the clean-up)."""
        if self.closed:
            return
        self.closed = True
        try:
            try:
                self._sync_logged()
            finally:  # what is on the host already is sent even when the device copy fails
                self.flush()
        finally:
            self.queue.put(None)
            self.writer.join(self.close_timeout)
            self.stopped.set()  # a writer still trying gives up; its chunks are in the spool
            if self.writer.is_alive() or self.unsent:
                log.warning(f"warning: run {self.run_id}: the tracking store has not taken every value after "
                            f"{self.close_timeout:g} s; they are kept in {self.spool.dir}")
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
            log.warning(f"warning: metrics not stored ({write_error}); the run ended with {exc_type.__name__}")
