"""Signals for the CLI's commands: SIGTERM stops a run as Ctrl-C does (the loops flush, the
run ends KILLED), and a repeated signal is told apart from its echo."""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import time

from clr_mlflow.core.interrupts import is_echo


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM is handled like Ctrl-C: a KeyboardInterrupt, so buffers flush and the run
    ends KILLED. A second signal exits at once (one within a second of the first is the same
    stop, delivered twice). Yields the signals received."""
    received: list[int] = []
    first_at = [0.0]

    def handler(signum, frame):
        if received:
            if is_echo(first_at[0]):  # the same stop delivered twice (see interrupts.py)
                return
            os._exit(128 + signum)
        received.append(signum)
        first_at[0] = time.monotonic()
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        if received:
            # Stopping on a signal: ours stays, so an echo of it cannot kill the exit; and when
            # Python's own finalisation begins (it resets handlers to the default, which
            # would let a late echo end the process with -15), the signals are ignored.
            atexit.register(lambda: [signal.signal(s, signal.SIG_IGN) for s in previous])
        else:
            for s, h in previous.items():
                signal.signal(s, h)
