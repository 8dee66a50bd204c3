"""The metric buffer against a real SQLite tracking store."""
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from clr_mlflow.tracking.iteration_logger import IterationLogger


def history(run_id, key):
    h = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in h], [m.value for m in h]


def test_buffer_sends_batches_not_one_call_per_value(tracking):
    with mlflow.start_run() as run, IterationLogger(run.info.run_id, flush_every=1000) as buf:
        for start in range(0, 2000, 8):
            steps = np.arange(start, start + 8)
            buf.series(steps, {"x/lr": steps * 0.5, "x/loss": steps * 2.0})
    assert buf.calls == 4  # 4000 values in batches of 1000, not 4000 calls
    steps, values = history(run.info.run_id, "x/lr")
    assert steps == list(range(2000)) and values == [s * 0.5 for s in range(2000)]


def test_everything_before_an_error_reaches_mlflow(tracking):
    with pytest.raises(RuntimeError, match="boom"):
        with mlflow.start_run() as run, IterationLogger(run.info.run_id, flush_every=10_000) as buf:
            for step in range(37):
                buf.series([step], {"x/loss": [float(step)]})
            raise RuntimeError("boom")
    steps, values = history(run.info.run_id, "x/loss")
    assert steps == list(range(37)) and values == [float(s) for s in range(37)]
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_log_every_thins_series_but_not_points(tracking):
    with mlflow.start_run() as run, IterationLogger(run.info.run_id, log_every=5) as buf:
        buf.series(np.arange(23), {"x/lr": np.arange(23) * 1.0})
        buf.points([3, 7], {"x/acc": [0.1, 0.2]})
    assert history(run.info.run_id, "x/lr")[0] == [0, 5, 10, 15, 20]
    assert history(run.info.run_id, "x/acc")[0] == [3, 7]
