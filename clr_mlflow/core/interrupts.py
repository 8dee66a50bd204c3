"""Holding SIGINT / SIGTERM until the training loop reaches a point where its state is whole.

A signal raises KeyboardInterrupt wherever Python happens to be: between the optimizer's
step and the scheduler's, say. A checkpoint taken there would resume one iteration off.
Inside `held_signals()` a signal is only recorded; the loop calls `deliver()` at the end of
an iteration (after it has drained and checkpointed), which hands the signal to the handler
that was installed before (the CLI's: the run ends KILLED, exit 130 / 143). A second signal
while one is held exits at once, as a second Ctrl-C should, unless it comes within
ECHO_SECONDS of the first: that is the same stop delivered twice (Ctrl-C under `mlflow run`
also arrives as the SIGTERM of MLflow's cancel; torchrun's agent forwards what it got), and
honouring it would skip the checkpoint.

`StopRequested` is the same stop asked for by code instead of a signal: a sink that can no
longer keep the values it is given (tracking: the store away and the spool full) raises it
from `series`/`points`; the training loop records it, finishes the iteration, checkpoints,
and raises it at the same boundary where it delivers a held signal.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
ECHO_SECONDS = 1.0


def is_echo(first_at: float) -> bool:
    """A signal arriving this soon after the first is the same request, not a second one."""
    return time.monotonic() - first_at < ECHO_SECONDS


class StopRequested(Exception):
    """The loop must stop at the end of this iteration (after its checkpoint): one line why.
    `iteration` is set by the loop to the number of iterations run when it stopped."""

    iteration: int | None = None


class HeldSignal:
    def __init__(self, previous: dict):
        self.previous = previous
        self.signum: int | None = None
        self.at = 0.0

    @property
    def pending(self) -> bool:
        return self.signum is not None

    def hold(self, signum, frame) -> None:
        if self.signum is not None:
            if is_echo(self.at):
                return
            os._exit(128 + signum)
        self.signum, self.at = signum, time.monotonic()

    def deliver(self) -> None:
        """Hand the held signal to the handler installed before: the CLI's raises
        KeyboardInterrupt and remembers which signal it was; any other (Python's default
        for SIGINT, the default for SIGTERM) becomes a KeyboardInterrupt here."""
        signum, self.signum = self.signum, None
        if signum is None:
            return
        for s, h in self.previous.items():  # a second signal from here on goes to that handler
            signal.signal(s, h)
        handler = self.previous.get(signum)
        if callable(handler):
            handler(signum, None)
        raise KeyboardInterrupt


@contextlib.contextmanager
def held_signals() -> Iterator[HeldSignal]:
    """SIGINT and SIGTERM recorded, not raised, inside the block (main thread only: elsewhere,
    e.g. a Ray Tune trial's thread, signals cannot be handled and nothing is held)."""
    if threading.current_thread() is not threading.main_thread():
        yield HeldSignal({})
        return
    held = HeldSignal({s: signal.getsignal(s) for s in SIGNALS})
    for s in SIGNALS:
        signal.signal(s, held.hold)
    try:
        yield held
    finally:
        for s, h in held.previous.items():
            signal.signal(s, h)
        if held.pending:  # arrived after the loop's last check: raise it now
            held.deliver()
