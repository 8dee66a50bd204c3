"""What clr_mlflow needs from MLflow that its public API offers only indirectly.

Only public names are used (no underscore-prefixed MLflow name or module); each way
round is pinned by a test (tests/test_embedding.py), so an MLflow release that changes it
fails our CI instead of a user's program.

1. `start_detached_run`: a new run in the experiment the caller made active
   (`mlflow.set_experiment`, MLFLOW_EXPERIMENT_NAME / _ID) that is *not* pushed onto the
   caller's active-run stack. MLflow has no public getter for the active experiment, but
   `mlflow.start_run` resolves it, and its active-run stack is thread-local: called on a
   short-lived thread, it makes the run exactly as the caller's own `start_run` would,
   and the caller's stack never sees it. The run is then written and ended by id.
2. `leave_fluent_run`: `mlflow.end_run` pops the run off the stack *before* it tells the
   store, so when the store is away the run still leaves the stack, which is all an
   application needs at the end of its own run (the status is journaled separately).
"""
from __future__ import annotations

import threading

import mlflow


def start_detached_run(run_name: str, tags: dict[str, str]) -> str:
    """A new run's id, in the caller's active experiment, off every active-run stack."""
    made: dict = {}

    def start() -> None:
        try:
            made["run_id"] = mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=False).info.run_id
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread below
            made["error"] = e

    thread = threading.Thread(target=start, name="clr_mlflow-start-run", daemon=True)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["run_id"]


def leave_fluent_run(run_id: str, status: str) -> None:
    """Take `run_id` off this thread's active-run stack if it is on top (nothing else is
    touched); the store's answer to the status MLflow sends on the way does not matter."""
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    try:
        mlflow.end_run(status)
    except Exception:  # noqa: BLE001 - the store is away: the run left the stack before the call
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            raise
