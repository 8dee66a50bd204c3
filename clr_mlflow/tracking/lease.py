"""An exclusive lease on a run, recorded in the tracking store, so that two `resume`s of one
run cannot both train it.

A lease is a generation n. Taking generation n is logging the param `clr_mlflow.lease.<n>`
= `<owner> <unix time>` (owner: `host/pid/nonce`): params are write-once in every MLflow
store (a second value for a key is refused; the SQL stores hold the key unique), so of the
processes that try the same generation at the same moment exactly one succeeds. The taker
then reads the param back and goes on only when it holds its own name: the first owner wins.
While it runs, a thread refreshes the tag `clr_mlflow.lease.<n>` = `<unix time>` every
`HEARTBEAT` seconds (one tag per generation: an owner that lost its lease cannot refresh its
successor's); the tag says `released` when it is done. A lease whose last heartbeat (or,
before the first, its taking) is older than `timeout` seconds (its owner was killed, or lost
the store) is stale: the next taker takes generation n + 1. Heartbeats are wall-clock times
of the owner's host, so clocks are assumed to agree within a fraction of `timeout`.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

PARAM = "clr_mlflow.lease."  # params <PARAM><n> (the taking), tags <PARAM><n> (the heartbeat)
HEARTBEAT = 10.0  # seconds between refreshes
TIMEOUT = float(os.environ.get("CLR_MLFLOW_LEASE_TIMEOUT", 120))  # seconds after which a lease is stale


class LeaseHeld(RuntimeError):
    """Another live process holds the run's lease: one line saying who, and since when."""


@dataclass(frozen=True)
class Holder:
    generation: int
    owner: str
    heartbeat: float | None  # None: released (or never beat)


def owner_name() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def current(run_id: str, client: MlflowClient | None = None) -> Holder | None:
    """The latest generation's holder, or None when the run never had a lease."""
    run = (client or MlflowClient()).get_run(run_id)
    generations = [int(k[len(PARAM):]) for k in run.data.params if k.startswith(PARAM) and k[len(PARAM):].isdigit()]
    if not generations:
        return None
    n = max(generations)
    owner, _, taken = run.data.params[f"{PARAM}{n}"].partition(" ")
    beat = run.data.tags.get(f"{PARAM}{n}", taken)
    if beat == "released":
        return Holder(n, owner, None)
    try:
        return Holder(n, owner, float(beat))
    except ValueError:
        return Holder(n, owner, 0.0)  # unreadable: stale


class Lease:
    """`with Lease(run_id):` holds the run's lease for the block (LeaseHeld when another
    live owner has it), beating the heartbeat from a daemon thread."""

    def __init__(self, run_id: str, timeout: float = TIMEOUT, heartbeat: float = HEARTBEAT):
        self.run_id, self.timeout, self.interval = run_id, timeout, heartbeat
        self.owner, self.generation = owner_name(), None
        self.client = MlflowClient()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _refuse(self, holder: Holder) -> LeaseHeld:
        age = time.time() - holder.heartbeat if holder.heartbeat else None
        beat = f"last heartbeat {age:.0f} s ago" if age is not None else "no heartbeat yet"
        return LeaseHeld(f"Expected run {self.run_id} to be free to resume, but {holder.owner} holds its lease "
                         f"(generation {holder.generation}, {beat}; a lease without a heartbeat for "
                         f"{self.timeout:g} s may be taken over)")

    def acquire(self) -> "Lease":
        holder = current(self.run_id, self.client)
        if holder is not None and holder.heartbeat is not None and time.time() - holder.heartbeat < self.timeout:
            raise self._refuse(holder)
        n = holder.generation + 1 if holder else 1
        key = f"{PARAM}{n}"
        try:
            self.client.log_param(self.run_id, key, f"{self.owner} {time.time():.3f}")
        except MlflowException:
            pass  # another value is there already: read back who has it
        got = self.client.get_run(self.run_id).data.params.get(key, "")
        if got.partition(" ")[0] != self.owner:  # another process took this generation first
            raise self._refuse(current(self.run_id, self.client) or Holder(n, got.partition(" ")[0], None))
        self.generation = n
        self._beat()
        self._thread = threading.Thread(target=self._beat_until_stopped, name=f"lease {self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        self.client.set_tag(self.run_id, f"{PARAM}{self.generation}", f"{time.time():.3f}")

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store away for a moment: the next beat may get through
                pass

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (when the store takes it; else it
        goes stale after `timeout`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        if self.generation is not None:
            try:
                self.client.set_tag(self.run_id, f"{PARAM}{self.generation}", "released")
            except Exception:  # noqa: BLE001
                pass
            self.generation = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
