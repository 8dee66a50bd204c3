"""Reading runs back from MLflow (the reading half of the tracking layer; tracking.py writes)."""
from __future__ import annotations

import io
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .tracking import BOUNDS_TABLE


BOUNDS_COLUMNS = ["rule", "base_lr", "max_lr", "selected", "note", "run_id"]


class NoRuns(ValueError):
    """The experiment is missing or holds nothing to compare."""


def experiment_runs(name: str) -> tuple[str, pd.DataFrame]:
    """(experiment id, runs as mlflow.search_runs gives them), comparison runs left out."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        raise NoRuns(f"Expected an existing experiment, but there is no experiment named {name!r}")
    runs = mlflow.search_runs([exp.experiment_id], max_results=50_000)
    if not runs.empty and "tags.clr_mlflow.kind" in runs:
        runs = runs[runs["tags.clr_mlflow.kind"] != "compare"]
    if runs.empty:
        raise NoRuns(f"Experiment {name!r} has no runs to compare")
    return exp.experiment_id, runs.reset_index(drop=True)


def metric_series(run_id: str, key: str, client: MlflowClient | None = None) -> pd.DataFrame:
    """Columns step, value, sorted by step (empty when the run never logged `key`)."""
    history = (client or MlflowClient()).get_metric_history(run_id, key)
    frame = pd.DataFrame({"step": [m.step for m in history], "value": [m.value for m in history]})
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


def bounds_tables(experiment_id: str, run_ids: list[str]) -> pd.DataFrame:
    """Every listed run's bounds table, with a run_id column (runs without one are skipped)."""
    if not run_ids:
        return pd.DataFrame(columns=BOUNDS_COLUMNS)
    try:
        return MlflowClient().load_table(experiment_id, BOUNDS_TABLE, run_ids=list(run_ids), extra_columns=["run_id"])
    except MlflowException:
        return pd.DataFrame(columns=BOUNDS_COLUMNS)


def range_curve(run_id: str) -> pd.DataFrame | None:
    """The full-resolution range-test curve (range_test/curve.csv), or None without one."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/range_test/curve.csv")
    except (MlflowException, OSError):
        return None
    return pd.read_csv(io.StringIO(text))


def chosen_bounds(run_id: str) -> tuple[float, float, str]:
    """(base_lr, max_lr, rule) chosen by an earlier run's range test. ValueError with a
    one-line reason when the run or its table does not exist or made no choice."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise ValueError(f"Expected bounds_from to name an existing run, but got {run_id!r}") from None
    table = bounds_tables(run.info.experiment_id, [run_id])
    if table.empty:
        raise ValueError(f"Expected bounds_from run {run_id} to have a {BOUNDS_TABLE} table, but it has none")
    row = table[table["selected"].astype(bool)]
    if row.empty or not np.isfinite(row["max_lr"].iloc[0]):
        raise ValueError(f"Expected bounds_from run {run_id} to have chosen bounds, but its chosen rule gave none")
    return float(row["base_lr"].iloc[0]), float(row["max_lr"].iloc[0]), str(row["rule"].iloc[0])


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    experiment: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


def run_record(run_id: str) -> RunRecord:
    """A run's params, metrics, tags and experiment name; ValueError if there is no such run."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"Expected RUN_ID to name an existing run, but got {run_id!r}") from None
    experiment = client.get_experiment(run.info.experiment_id).name
    return RunRecord(run_id, experiment, dict(run.data.params), dict(run.data.metrics), dict(run.data.tags))
