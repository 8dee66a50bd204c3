"""Tracking (writing), per iteration: IterationLogger, the batched metric buffer of every
loop. Its chunks go to the run's spool (spool.py) before a background thread sends them."""
from __future__ import annotations

import itertools
import logging
import numbers
import queue
import re
import threading
import time

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from clr_mlflow.tracking import delivery
from clr_mlflow.tracking import spool
from clr_mlflow.core.checks import is_finite, is_int, need

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow makes: uuid4().hex
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

    Args:
        run_id: The MLflow run to log into; None (default): the active run.
        prefix: Put before every key `log` records (`prefix="train/"`: `train/loss`).
        log_every: Keep only the steps that are multiples of it (`log`, `series`); a
            positive integer.
        flush_every: Send a `log_batch` once about this many values are buffered.
        flush_seconds: Send what is buffered at least this often, in seconds (when a value
            arrives); also how much a SIGKILL can lose.
        sync_every: Bring `log`'s tensors to the host together every this many calls.
        client: The `MlflowClient` to write with; None: one for the current tracking URI.
        close_timeout: Seconds `close` (and leaving the `with` block) waits for the store.

    Raises:
        ValueError: No `run_id` and no active MLflow run, or an argument out of range (a
            `run_id` that is not 32 lowercase hex characters, a `log_every` that is not a
            positive integer...): one line naming it, before anything is opened.

    Examples:
        >>> import tempfile
        >>> import mlflow, torch
        >>> from clr_mlflow import IterationLogger
        >>> mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
        >>> loader = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(5)]
        >>> with mlflow.start_run() as run, IterationLogger(prefix="train/") as log:
        ...     for step, (x, y) in enumerate(loader):
        ...         loss = torch.nn.functional.mse_loss(model(x), y)
        ...         optimizer.zero_grad()
        ...         loss.backward()
        ...         optimizer.step()
        ...         log.log(step, lr=scheduler.get_last_lr()[0], loss=loss)
        ...         scheduler.step()
        >>> history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/lr")
        >>> [(m.step, round(m.value, 6)) for m in history]
        [(0, 0.1), (1, 0.1), (2, 0.01), (3, 0.01), (4, 0.001)]
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
        need(isinstance(run_id, str) and RUN_ID.fullmatch(run_id) is not None, "run_id",
             "None or a run id of 32 lowercase hex characters as", run_id)
        need(isinstance(prefix, str), "prefix", "a string as", prefix)
        need(is_int(log_every, 1), "log_every", "positive integer", log_every)
        need(is_int(flush_every, 1), "flush_every", "positive integer", flush_every)
        need(is_finite(flush_seconds) and flush_seconds >= 0, "flush_seconds", "non-negative finite", flush_seconds)
        need(is_int(sync_every, 1), "sync_every", "positive integer", sync_every)
        need(is_finite(close_timeout) and close_timeout >= 0, "close_timeout", "non-negative finite", close_timeout)
        need(client is None or isinstance(client, MlflowClient), "client", "None or an MlflowClient as",
             type(client).__name__)
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
        self.unsent: dict[int, tuple[int, int, int, int]] = {}  # number -> (token, first step, last step, values)
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
        """Record `values` (floats or 0-dim tensors) at `step`, under `prefix`.

        Tensors stay where they are (on the GPU too) until `sync_every` calls have gathered
        them; nothing here waits for the device or the store.

        Args:
            step: The iteration; a step that is not a multiple of `log_every` is skipped.
            **values (float | torch.Tensor): The metrics, by name: a float, an int, a NumPy number or a
                one-element tensor each (a tensor that needs grad is detached).

        Raises:
            ValueError: A value that is not one number (a bool, a string, a tensor of more
                than one element...), at this call and before anything of it is kept.

        Examples:
            >>> import tempfile, torch
            >>> from mlflow import MlflowClient
            >>> from clr_mlflow import IterationLogger
            >>> client = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
            >>> run_id = client.create_run("0").info.run_id
            >>> with IterationLogger(run_id, client=client, log_every=2) as log:
            ...     for step in range(5):
            ...         log.log(step, loss=torch.tensor(1.0 / (step + 1)), lr=0.1)
            >>> [(m.step, round(m.value, 3)) for m in client.get_metric_history(run_id, "loss")]
            [(0, 1.0), (2, 0.333), (4, 0.2)]
            >>> with IterationLogger(run_id, client=client) as log:  # doctest: +ELLIPSIS
            ...     log.log(5, loss=torch.ones(3))
            Traceback (most recent call last):
            ...
            ValueError: Expected a number or a one-element tensor ..., but got a tensor of shape (3,)
        """
        if not isinstance(step, numbers.Integral) or isinstance(step, bool):
            raise ValueError(f"Expected an integer step for IterationLogger.log(step, ...), but got {step!r}"[:160])
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
        """Record whole arrays: `values[key][i]` at `steps[i]`, keeping only the steps that
        are multiples of `log_every` (as `log` does). Keys are stored as given (`prefix` is
        not added).

        Args:
            steps (Sequence[int] | numpy.ndarray): The steps.
            values: Metric name -> numbers, each as long as `steps`.

        Examples:
            >>> import tempfile
            >>> from mlflow import MlflowClient
            >>> from clr_mlflow import IterationLogger
            >>> client = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
            >>> run_id = client.create_run("0").info.run_id
            >>> with IterationLogger(run_id, client=client, log_every=10) as log:
            ...     log.series(range(30), {"range_test/lr": [0.001 * 2**i for i in range(30)]})
            >>> [m.step for m in client.get_metric_history(run_id, "range_test/lr")]
            [0, 10, 20]
        """
        if self.log_every > 1:
            keep = np.asarray(steps) % self.log_every == 0
            steps, values = np.asarray(steps)[keep], {k: np.asarray(v)[keep] for k, v in values.items()}
        self.points(steps, values)

    def points(self, steps, values: dict) -> None:
        """Record whole arrays like `series`, keeping every step (whatever `log_every` is):
        for values measured now and then, such as held-out evaluations. Keys are stored as
        given (`prefix` is not added). The buffer is sent once it holds `flush_every`
        values or `flush_seconds` have passed.

        Args:
            steps (Sequence[int] | numpy.ndarray): The steps.
            values: Metric name -> numbers, each as long as `steps`.

        Examples:
            >>> import tempfile
            >>> from mlflow import MlflowClient
            >>> from clr_mlflow import IterationLogger
            >>> client = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
            >>> run_id = client.create_run("0").info.run_id
            >>> with IterationLogger(run_id, client=client, log_every=10) as log:
            ...     log.points([9, 19], {"val/accuracy": [0.5, 0.75]})
            >>> [(m.step, m.value) for m in client.get_metric_history(run_id, "val/accuracy")]
            [(9, 0.5), (19, 0.75)]
        """
        steps = np.array(steps, dtype=np.int64)
        if len(steps):
            self.pending.append((int(time.time() * 1000), steps, {k: np.array(v, dtype=float) for k, v in values.items()}))
            self.pending_values += len(steps) * len(values)
        if self.pending_values >= self.flush_every or time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()
        if self.spool.stranded and not self.spool.stop_raised:
            # Neither the store nor the spool takes values: the loop stops at its iteration's
            # end (a training loop checkpoints first). The values given here are still queued.
            self.spool.stop_raised = True
            raise spool.Stranded(self.spool)

    def flush(self) -> None:
        """Hand what `series` and `points` buffered (and what `log` has brought to the host)
        to the writer thread, now: appended to the run's spool first, then sent in the
        background. Returns without waiting for the store; `close` waits.

        Examples:
            >>> import tempfile
            >>> from mlflow import MlflowClient
            >>> from clr_mlflow import IterationLogger
            >>> client = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
            >>> run_id = client.create_run("0").info.run_id
            >>> log = IterationLogger(run_id, client=client)
            >>> log.points([0, 1], {"val/loss": [0.5, 0.25]})
            >>> log.flush()   # on its way to the store
            >>> log.close()   # stored
            >>> [m.value for m in client.get_metric_history(run_id, "val/loss")]
            [0.5, 0.25]
        """
        self.last_flush = time.monotonic()
        if self.pending:
            # Journaled before the buffer lets go of it: a Ctrl-C between the two leaves it in
            # both (replays skip points the store has), never in neither.
            token = self.spool.append_metrics(self.pending)  # on disk before it is sent: SIGKILL-proof
            chunks, self.pending, self.pending_values = self.pending, [], 0
            number = next(self.chunks)
            self.unsent[number] = (token, min(int(c[1].min()) for c in chunks), max(int(c[1].max()) for c in chunks),
                                   sum(len(c[1]) * len(c[2]) for c in chunks))
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
                if not token:  # not in the spool either (a full disk): kept nowhere but here
                    self.spool.stranded = True
                self.stopped.wait(delay)  # SQL stores keep one row per (key, timestamp, step, value)
                delay = min(2 * delay, RETRY_CAP)
            else:
                self.spool.delivered(token)
                self.unsent.pop(number, None)
                return

    def close(self) -> None:
        """Send what is buffered, wait up to `close_timeout` for the store, stop the writer
        thread and let go of the spool — all of it also when sending fails on the way (the
        first such error is raised after, never instead of, the clean-up).

        What the store has not taken after `close_timeout` seconds stays in the spool
        (a warning says where; `clr-mlflow sync` sends it). Leaving the `with` block calls
        it; a second call does nothing.

        Raises:
            Exception: The first error met on the way (bringing logged tensors to the host,
                journaling), or else the first write the store refused (e.g. an
                `MlflowException`), after the clean-up.

        Examples:
            >>> import tempfile
            >>> from mlflow import MlflowClient
            >>> from clr_mlflow import IterationLogger
            >>> client = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
            >>> run_id = client.create_run("0").info.run_id
            >>> log = IterationLogger(run_id, client=client, prefix="train/")
            >>> for step in range(3):
            ...     log.log(step, loss=0.5 * step)
            >>> log.close()
            >>> log.close()   # already closed: nothing to do
            >>> [m.value for m in client.get_metric_history(run_id, "train/loss")]
            [0.0, 0.5, 1.0]
        """
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
            unkept = [(first, last, n) for token, first, last, n in list(self.unsent.values()) if not token]
            for first, last, n in unkept:  # neither sent nor spooled (a full disk): said, never dropped silently
                self.spool.strand(first, last, n)
            if unkept and not self.spool.stop_raised:
                log.warning(f"warning: {self.spool.stranded_line(None)}")
            elif (self.writer.is_alive() or self.unsent) and not unkept and not self.spool.stop_raised:
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
