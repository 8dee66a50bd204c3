"""Reading runs back from MLflow (the reading half of the tracking layer; tracking.py writes)."""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

BOUNDS_TABLE = "range_test/bounds.json"  # where lr_find logs its bounds table (runs.log_table), read here


BOUNDS_COLUMNS = ["rule", "base_lr", "max_lr", "selected", "note", "run_id"]


class NoRuns(ValueError):
    """The experiment is missing or holds nothing to compare."""


PROGRESS_BAR_VAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextlib.contextmanager
def quiet_downloads():
    """Turn off MLflow's "Downloading artifacts" tqdm bars while reading: we fetch small
    JSON/CSV files, one per run, and a bar each would bury the leaderboard. MLflow reads
    the variable whenever it is about to draw a bar, so setting it for the duration is
    enough; the previous value (or its absence) is restored afterwards."""
    before = os.environ.get(PROGRESS_BAR_VAR)
    os.environ[PROGRESS_BAR_VAR] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_BAR_VAR, None)
        else:
            os.environ[PROGRESS_BAR_VAR] = before


def is_comparison(runs: pd.DataFrame) -> pd.Series:
    """Rows of mlflow.search_runs output that are not results of their own: comparison runs
    (tagged clr_mlflow.kind=compare, or made by `mlflow run -e compare`, tagged by MLflow
    before our code could tag them) and the empty runs `mlflow run -e resume` / `-e sync`
    make (the results go to the run resumed or synced)."""
    out = pd.Series(False, index=runs.index)
    for column in ("tags.clr_mlflow.kind", "tags.mlflow.project.entryPoint"):
        if column in runs:
            out |= runs[column].fillna("").isin(("compare", "resume", "sync"))
    return out


def experiment_runs(name: str, exclude: tuple[str, ...] = ()) -> tuple[str, pd.DataFrame]:
    """(experiment id, runs as mlflow.search_runs gives them), comparison runs and the runs
    in `exclude` (the comparison being made now) left out."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        raise NoRuns(f"Expected an existing experiment, but there is no experiment named {name!r}")
    runs = mlflow.search_runs([exp.experiment_id], max_results=50_000)
    if not runs.empty:
        runs = runs[~is_comparison(runs) & ~runs["run_id"].isin(exclude)]
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
        with quiet_downloads():
            return MlflowClient().load_table(experiment_id, BOUNDS_TABLE, run_ids=list(run_ids),
                                             extra_columns=["run_id"])
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # only "no such table" means none; a store error shows
            raise
        return pd.DataFrame(columns=BOUNDS_COLUMNS)


def artifact_csv(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV artifact of a run as a DataFrame, or None when the run has no such file."""
    try:
        with quiet_downloads():
            text = mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except (MlflowException, OSError):
        return None
    return pd.read_csv(io.StringIO(text))


RANGE_CURVE, TRAIN_CURVE = "range_test/curve.csv", "train/curve.csv"


def range_curve(run_id: str) -> pd.DataFrame | None:
    """The full-resolution range-test curve (range_test/curve.csv), or None without one."""
    return artifact_csv(run_id, RANGE_CURVE)


def train_curve(run_id: str) -> pd.DataFrame | None:
    """The full-resolution training curve (train/curve.csv: every iteration), or None."""
    return artifact_csv(run_id, TRAIN_CURVE)


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
    experiment_id: str = ""
    status: str = ""

    @property
    def name(self) -> str:
        return self.tags.get("mlflow.runName", "")


def run_record(run_id: str) -> RunRecord:
    """A run's params, metrics, tags and experiment name; ValueError if there is no such run."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"Expected RUN_ID to name an existing run, but got {run_id!r}") from None
    experiment = client.get_experiment(run.info.experiment_id).name
    return RunRecord(run_id, experiment, dict(run.data.params), dict(run.data.metrics), dict(run.data.tags),
                     run.info.experiment_id, run.info.status)


def download_artifact(run_id: str, path: str, dst: Path) -> Path | None:
    """A run's artifact file copied into the folder `dst`, or None when the run has none."""
    try:
        with quiet_downloads():
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))
    except (MlflowException, OSError):
        return None


def last_step(run_id: str, key: str) -> int:
    """The last step of a run's metric `key` (-1 when it has none)."""
    steps = metric_series(run_id, key)["step"]
    return int(steps.max()) if len(steps) else -1


@dataclass(frozen=True)
class Location:
    """Where to look at a run: its experiment, the tracking store and the UI."""
    experiment: str
    experiment_id: str
    run_id: str
    tracking_uri: str  # absolute where it was a relative file/sqlite path

    @property
    def is_server(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    @property
    def ui_path(self) -> str:
        """The run's page, relative to the UI's address (or absolute on a tracking server)."""
        path = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"{self.tracking_uri.rstrip('/')}/{path}" if self.is_server else path

    @property
    def ui_command(self) -> str | None:
        """The `mlflow ui` command that opens this store (None for a tracking server)."""
        if self.is_server:
            return None
        import shlex

        return f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}"


def absolute_store_uri(uri: str) -> str:
    """`uri` with a relative sqlite:/// or file path made absolute, so the `mlflow ui`
    command printed for it works from any directory."""
    from pathlib import Path

    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///"):]
        return "sqlite:///" + str(Path(path).resolve()) if path and path != ":memory:" else uri
    if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):
        return str(Path(uri).resolve())
    return uri


def location(run_id: str) -> Location:
    """Where `run_id` can be looked at (its experiment, the store, the UI path)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id).name
    return Location(experiment, run.info.experiment_id, run_id, absolute_store_uri(mlflow.get_tracking_uri()))
