"""The only module that talks to MLflow: the run, params, the batched metric buffer, artifacts."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.figure
import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric

BOUNDS_TABLE = "range_test/bounds.json"


class MetricBuffer:
    """Collects per-iteration values as arrays and stores them with `log_batch` calls of
    about `flush_every` values, made by one background thread: the loop pays only for
    keeping the arrays (well under a microsecond a value); building MLflow's Metric objects
    and the SQLite writes happen beside it. `series` keeps only steps that are multiples of
    `log_every` (the CSV artifacts keep every iteration); `points` keeps everything.
    A context manager: leaving it, normally or by an exception (Ctrl-C included), sends
    the rest and waits until MLflow has stored it all; a failed write is raised there."""

    def __init__(self, run_id: str, flush_every: int = 3000, log_every: int = 1, client: MlflowClient | None = None):
        self.run_id = run_id
        self.flush_every = flush_every
        self.log_every = log_every
        self.client = client or MlflowClient()
        self.pending: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []
        self.pending_values = 0
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clr_mlflow-metrics")
        self.in_flight = []
        self.calls = 0

    def series(self, steps, values: dict) -> None:
        if self.log_every > 1:
            keep = np.asarray(steps) % self.log_every == 0
            steps, values = np.asarray(steps)[keep], {k: np.asarray(v)[keep] for k, v in values.items()}
        self.points(steps, values)

    def points(self, steps, values: dict) -> None:
        steps = np.array(steps, dtype=np.int64)
        if len(steps):
            self.pending.append((int(time.time() * 1000), steps, {k: np.array(v, dtype=float) for k, v in values.items()}))
            self.pending_values += len(steps) * len(values)
        if self.pending_values >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.in_flight.append(self.writer.submit(self._write, self.pending))
            self.calls += 1
            self.pending, self.pending_values = [], 0

    def _write(self, chunks) -> None:
        metrics = [Metric(key, v, ts, s) for ts, steps, values in chunks for key, vals in values.items()
                   for s, v in zip(steps.tolist(), vals.tolist())]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def close(self) -> None:
        self.flush()
        in_flight, self.in_flight = self.in_flight, []
        try:
            for future in in_flight:
                future.result()
        finally:
            self.writer.shutdown(wait=True)

    def __enter__(self) -> "MetricBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def active_run(experiment: str, run_name: str = "", tags: dict | None = None):
    """The run to log into: the one `mlflow run` made (MLFLOW_RUN_ID), else a new one in
    `experiment`. MLflow marks it FAILED if the body raises."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name or None, tags=tags) as run:
        yield run


def git_commit() -> str:
    """Commit of the clr_mlflow source tree, when it is a git checkout ('' otherwise)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")) if out.returncode == 0 else ""


def provenance_tags(device: str) -> dict[str, str]:
    import torch

    from . import __version__

    return {
        "clr_mlflow.version": __version__,
        "clr_mlflow.git_commit": git_commit(),
        "clr_mlflow.python": platform.python_version(),
        "clr_mlflow.torch": torch.__version__,
        "clr_mlflow.mlflow": mlflow.__version__,
        "clr_mlflow.device": device,
    }


def log_params(params: dict) -> None:
    """Log params not yet in the run. `mlflow run` has already logged its entry point's
    parameters as the user typed them ("10" where we would write "10.0"); those stay."""
    run = mlflow.active_run()
    present = MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in present})


def log_metrics(values: dict[str, float]) -> None:
    mlflow.log_metrics(values)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_figure(fig: matplotlib.figure.Figure, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, path)
    plt.close(fig)


def log_frame_csv(df: pd.DataFrame, path: str) -> None:
    mlflow.log_text(df.to_csv(index=False), path)


def log_table(table: pd.DataFrame, path: str) -> None:
    mlflow.log_table(table, artifact_file=path)


def log_state_dict(state_dict: dict, path: str) -> None:
    """Save a plain state_dict with torch.save and log it at `path` (a folder/file.pt)."""
    import tempfile

    import torch

    folder, name = path.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({k: v.cpu() for k, v in state_dict.items()}, Path(tmp) / name)
        mlflow.log_artifact(str(Path(tmp) / name), artifact_path=folder)
