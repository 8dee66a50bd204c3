"""`clr-mlflow resume RUN_ID`: continue an interrupted training in the same MLflow run, from
the checkpoint it left (train/checkpoint.pt), with the run's own params."""
from __future__ import annotations

import os
import tempfile

from clr_mlflow.core import checkpoint
from clr_mlflow.tracking import history
from clr_mlflow.tracking import spool
from clr_mlflow.tracking import runs as tracking
from clr_mlflow.app.config import ConfigError
from clr_mlflow.app.review import MLFLOW_RUN_TAG, config_of_run, run_command
from clr_mlflow.app.runner import Outcome, Resumption, execute


def resume(run_id: str) -> Outcome:
    """Reopen `run_id` (status RUNNING again) and train on from its checkpoint: the series
    continue at the next step, and it ends FINISHED. One-line ConfigError for a store that
    does not answer, a run that is missing, finished, not a training run of ours, without a
    checkpoint, or whose logged series stop short of its checkpoint (a spool not sent)."""
    try:
        tracking.check_store(None)
    except tracking.StoreError as e:
        raise ConfigError(str(e)) from None
    leader = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone sends and tags
    if leader:
        _sync_spools(run_id)  # what a killed process left unsent goes first, so nothing is logged twice
    try:
        run = history.run_record(run_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    command = run_command(run)
    if command is None or command == "range-test":
        raise ConfigError(f"Expected RUN_ID to name a training run of clr_mlflow, but {run_id} is not one")
    if run.status == "FINISHED":
        raise ConfigError(f"Expected RUN_ID to name an interrupted run, but {run_id} is FINISHED: nothing to resume")
    with tempfile.TemporaryDirectory(prefix="clr_mlflow-") as tmp:
        path = history.download_artifact(run_id, f"{checkpoint.ARTIFACT_DIR}/{checkpoint.FILE}", tmp)
        if path is None:
            raise ConfigError(f"Expected run {run_id} to have a checkpoint ({checkpoint.ARTIFACT_DIR}/{checkpoint.FILE}),"
                              " but it has none: it stopped before training's first checkpoint (see checkpoint_every);"
                              " run it again instead")
        try:
            state = checkpoint.load(path)
        except checkpoint.CheckpointError as e:
            raise ConfigError(str(e)) from None
    cfg = config_of_run(run.params, run.experiment, shell_quoted=MLFLOW_RUN_TAG in run.tags, run_name=run.name)
    logged = {key: history.last_step(run_id, key) for key in run.metrics if key.startswith(("train/", "val/"))}
    _check_no_gap(run_id, state["loop"]["t"], cfg.log_every, logged.get("train/lr", -1))
    made = os.environ.get("MLFLOW_RUN_ID")
    if leader and made and made != run_id:  # `mlflow run -e resume` made a run for this command: no result in it
        tracking.set_tags({"clr_mlflow.kind": "resume", "clr_mlflow.resumes": run_id,
                           "mlflow.note.content": f"`resume` of run {run_id}: its metrics and model are there."},
                          run_id=made)
    return execute(cfg, command, resume=Resumption(run_id, state, logged))


def _sync_spools(run_id: str) -> None:
    for folder in spool.folders(run_id):
        try:
            print(spool.sync(folder))
        except spool.SyncError as e:
            raise ConfigError(f"Expected run {run_id}'s spool to be sent before resuming, but: {e}") from None


def _check_no_gap(run_id: str, t: int, log_every: int, last_logged: int) -> None:
    """The checkpoint is at iteration t; the run must hold the series up to t - 1 (the last
    multiple of log_every), else the steps between would never be logged."""
    expected = (t - 1) - (t - 1) % log_every if t > 0 else -1
    if last_logged < expected:
        raise ConfigError(
            f"Expected run {run_id}'s train/lr to reach step {expected}, where its checkpoint is, but it ends at "
            f"{last_logged}: the rest waits in a spool folder not under {spool.spool_root()} (send it with "
            "`clr-mlflow sync FOLDER`, or set CLR_MLFLOW_SPOOL_DIR to the folder's parent)")
