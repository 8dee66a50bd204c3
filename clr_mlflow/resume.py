"""`clr-mlflow resume RUN_ID`: continue an interrupted training in the same MLflow run, from
the checkpoint it left (train/checkpoint.pt), with the run's own params."""
from __future__ import annotations

import os
import tempfile

from . import checkpoint, history, tracking
from .config import ConfigError
from .review import MLFLOW_RUN_TAG, config_of_run, run_command
from .runner import Outcome, Resumption, execute


def resume(run_id: str) -> Outcome:
    """Reopen `run_id` (status RUNNING again) and train on from its checkpoint: the series
    continue at the next step, and it ends FINISHED. One-line ConfigError for a run that is
    missing, finished, not a training run of ours, or without a checkpoint."""
    try:
        run = history.run_record(run_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    command = run_command(run)
    if command is None or command == "range-test":
        raise ConfigError(f"Expected RUN_ID to name a training run of clr_mlflow, but {run_id} is not one")
    if run.status == "FINISHED":
        raise ConfigError(f"Expected RUN_ID to name an interrupted run, but {run_id} is FINISHED: nothing to resume")
    _sync_spool(run_id)  # what a killed process left unsent goes first, so nothing is logged twice
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
    made = os.environ.get("MLFLOW_RUN_ID")
    if made and made != run_id:  # `mlflow run -e resume` made a run for this command: it holds no result
        tracking.set_tags({"clr_mlflow.kind": "resume", "clr_mlflow.resumes": run_id,
                           "mlflow.note.content": f"`resume` of run {run_id}: its metrics and model are there."},
                          run_id=made)
    cfg = config_of_run(run.params, run.experiment, shell_quoted=MLFLOW_RUN_TAG in run.tags, run_name=run.name)
    logged = {key: history.last_step(run_id, key) for key in run.metrics if key.startswith(("train/", "val/"))}
    return execute(cfg, command, resume=Resumption(run_id, state, logged))


def _sync_spool(run_id: str) -> None:
    from . import spool

    found = spool.find(run_id)
    if found is not None:
        print(spool.sync(found))
