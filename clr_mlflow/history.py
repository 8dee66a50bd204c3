"""Reading runs back from MLflow (the reading half of the tracking layer; tracking.py writes)."""
from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .tracking import BOUNDS_TABLE


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
    try:
        return MlflowClient().load_table(experiment_id, BOUNDS_TABLE, run_ids=list(run_ids), extra_columns=["run_id"])
    except MlflowException:
        return pd.DataFrame(columns=["rule", "base_lr", "max_lr", "selected", "note", "run_id"])


def range_curve(run_id: str) -> pd.DataFrame | None:
    """The full-resolution range-test curve (range_test/curve.csv), or None without one."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/range_test/curve.csv")
    except (MlflowException, OSError):
        return None
    return pd.read_csv(io.StringIO(text))


def finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v)]
