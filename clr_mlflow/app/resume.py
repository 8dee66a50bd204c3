"""`clr-mlflow resume RUN_ID`: continue an interrupted training in the same MLflow run, from
the checkpoint it left (train/checkpoint.pt), with the run's own params."""
from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from clr_mlflow.core import checkpoint
from clr_mlflow.core.checkpoint_checks import validate_checkpoint
from clr_mlflow.core.engine import make_optimizer
from clr_mlflow.data import plugins
from clr_mlflow.data.models import build_model
from clr_mlflow.tracking import history
from clr_mlflow.tracking import spool
from clr_mlflow.tracking import sync as spool_sync
from clr_mlflow.tracking import runs as tracking
from clr_mlflow.tracking.lease import Lease, LeaseHeld
from clr_mlflow.app.args import run_id as checked_run_id
from clr_mlflow.app.config import Config, ConfigError
from clr_mlflow.app.presets import apply_preset, param_groups
from clr_mlflow.app.review import MLFLOW_RUN_TAG, config_of_run, require_consent, require_store, run_command
from clr_mlflow.app.runner import Outcome, Resumption, execute


def resume(run_id: str, allow_plugins: bool = False) -> Outcome:
    """Reopen `run_id` (status RUNNING again) and train on from its checkpoint: the series
    continue at the next step, and it ends FINISHED. One-line ConfigError, before anything
    is changed, for a malformed id, a store that does not answer, a run that is missing,
    finished, not a training run of ours, without a checkpoint or with one that does not fit
    its model, a plug-in without `allow_plugins`, a run another process is resuming (its
    lease, tracking/lease.py), or whose logged series stop short of its checkpoint."""
    checked_run_id(run_id)
    require_store()
    leader = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone sends and tags
    run = _record(run_id)
    command = run_command(run)
    if command is None or command == "range-test":
        raise ConfigError(f"Expected RUN_ID to name a training run of clr_mlflow, but {run_id} is not one")
    _not_finished(run)
    cfg = config_of_run(run.params, run.experiment, shell_quoted=MLFLOW_RUN_TAG in run.tags, run_name=run.name)
    require_consent(run_id, cfg, allow_plugins)
    with plugins.installed_only(), contextlib.ExitStack() as held:
        # The lease, then the first write: what a killed process left unsent goes first, so
        # nothing is logged twice. Before the checkpoint is checked only when there is such a
        # spool (the checkpoint itself may wait in it); else nothing is written before.
        early = leader and bool(spool.folders(run_id))
        if early:
            run = _take(held, run_id)
        state = _checkpoint(run_id, cfg, run.params)
        if leader and not early:
            run = _take(held, run_id)
        logged = {key: history.last_step(run_id, key) for key in run.metrics if key.startswith(("train/", "val/"))}
        _check_no_gap(run_id, state["loop"]["t"], cfg.log_every, logged.get("train/lr", -1))
        made = os.environ.get("MLFLOW_RUN_ID")
        if leader and made and made != run_id:  # `mlflow run -e resume` made a run for this command
            tracking.set_tags({"clr_mlflow.kind": "resume", "clr_mlflow.resumes": run_id,
                               "mlflow.note.content": f"`resume` of run {run_id}: its metrics and model are there."},
                              run_id=made)
        return execute(cfg, command, resume=Resumption(run_id, state, logged))


def _take(held: contextlib.ExitStack, run_id: str) -> history.RunRecord:
    """The run's lease (held until `held` closes), its spool sent, and the run read again."""
    try:
        held.enter_context(Lease(run_id))
    except LeaseHeld as e:
        raise ConfigError(str(e)) from None
    _sync_spools(run_id)
    run = _record(run_id)
    _not_finished(run)
    return run


def _record(run_id: str) -> history.RunRecord:
    try:
        return history.run_record(run_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _not_finished(run: history.RunRecord) -> None:
    if run.status == "FINISHED":
        raise ConfigError(f"Expected RUN_ID to name an interrupted run, but {run.run_id} is FINISHED: "
                          "nothing to resume")


def _checkpoint(run_id: str, cfg: Config, params: dict) -> dict:
    """The run's checkpoint, downloaded and checked against the model and optimizer the run
    builds (their shapes; no data is loaded) before anything is changed."""
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
    model = optimizer = None
    used = apply_preset(cfg)[0]
    classes = params.get("data.num_classes", "")
    if classes.isdigit():
        try:
            with torch.random.fork_rng(devices=[]):  # the run's own seeding stays untouched
                model = build_model(used.model, int(classes), used.image_size)
                optimizer = make_optimizer(model, used.optimizer, used.lr_start, used.momentum, used.nesterov,
                                           used.weight_decay, param_groups(used, model))
        except (ValueError, plugins.PluginError) as e:
            raise ConfigError(str(e)) from None
    try:
        validate_checkpoint(state, model, optimizer,
                            source=f"run {run_id}'s {checkpoint.ARTIFACT_DIR}/{checkpoint.FILE}")
    except checkpoint.CheckpointError as e:
        raise ConfigError(str(e)) from None
    return state


def _sync_spools(run_id: str) -> None:
    """The run's own spool folders sent first: only those whose run.json names it, each
    checked as `sync` checks it (ours, private, naming only files inside it)."""
    for folder in spool.folders(run_id):
        try:
            print(spool_sync.sync(folder, run_id=run_id))
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
