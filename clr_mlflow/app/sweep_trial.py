"""One sweep trial, in the process Ray Tune runs it in: its MLflow run (a child of the
sweep's parent run), the runner inside it, val/accuracy to Tune after every epoch, and the
run closed with the trial's outcome."""
from __future__ import annotations

import os

from clr_mlflow.app.config import COMMANDS, Config, ConfigError

PARENT, TRIAL, SETTING = "mlflow.parentRunId", "clr_mlflow.sweep.trial", "clr_mlflow.sweep.setting"
OUTCOME, ERROR = "clr_mlflow.sweep.outcome", "clr_mlflow.error"  # outcome: finished, failed or early_stopped
METRIC = "val/accuracy"  # reported to Tune each epoch; --early-stop's ASHA maximises it


def enter(spec: dict) -> None:
    """A trial's process: the driver's store and directory, and no run to resume."""
    os.environ["MLFLOW_TRACKING_URI"] = spec["tracking_uri"]
    os.environ.pop("MLFLOW_RUN_ID", None)  # inherited from `mlflow run -e sweep`: it names the parent
    os.chdir(spec["cwd"])


def run_trial(config: dict) -> None:
    """One Tune trial. Its run is made first, so a failure before the runner's own run still
    has a run to say so; `execute` then logs into it, as into a run `mlflow run` hands over."""
    from ray import tune

    from clr_mlflow.tracking import runs as tracking
    from clr_mlflow.app.runner import execute

    spec = config["trial"]
    enter(spec)
    cfg = Config(**spec["config"])
    with tracking.active_run(cfg.experiment, cfg.run_name, spec["tags"]) as run:
        # The config as given (the runner logs the same values), and bounds_source before its "given".
        tracking.log_params(cfg.params(COMMANDS[spec["command"]]) | spec["params"])
    error, sent = None, []

    def on_epoch(row: dict) -> None:
        # Each epoch's val/accuracy to Tune (ASHA's input), one epoch late: the last epoch is
        # not known before training ends, and a stop there would only lose the test evaluation.
        if sent:
            tune.report(sent[-1])
        sent.append({METRIC: float(row["val_accuracy"]), "iterations": int(row["step"]) + 1})

    try:
        if spec["error"]:
            raise ConfigError(spec["error"])
        os.environ["MLFLOW_RUN_ID"] = run.info.run_id
        execute(cfg, spec["command"], spec["tags"], on_epoch=on_epoch if spec["command"] == "train" else None)
    except Exception as e:  # noqa: BLE001 - recorded in its run, and the sweep goes on (ASHA's SystemExit passes)
        error = f"{type(e).__name__}: {e}"
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)
    close_runs([spec], [run.info.run_id], ["failed" if error else "finished"], [error])
    if spec["command"] == "train":  # the last epoch's (a stop now costs nothing), or NaN: Tune wants its
        tune.report(sent[-1] if sent else {METRIC: float("nan")})  # scheduler's metric; ASHA skips NaN


class _Failed(Exception):
    """Raised in a resumed run so that tracking.active_run ends it FAILED."""


def close_runs(specs, run_ids, outcomes, errors) -> None:
    """End trials' runs tagged with their outcome: FINISHED, or FAILED with the error (a new
    run for a trial that made none). tracking tags only the active run: each is resumed."""
    from clr_mlflow.tracking import runs as tracking

    enter(specs[0])
    for spec, run_id, outcome, error in zip(specs, run_ids, outcomes, errors):
        cfg = spec["config"]
        if run_id:
            os.environ["MLFLOW_RUN_ID"] = run_id
        try:
            with tracking.active_run(cfg["experiment"], cfg["run_name"], spec["tags"] | spec["final"] | {
                    OUTCOME: outcome} | ({ERROR: error[:5000]} if error else {})):
                if outcome == "failed":
                    raise _Failed
        except _Failed:
            pass
        finally:
            os.environ.pop("MLFLOW_RUN_ID", None)
