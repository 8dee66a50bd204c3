"""clr_mlflow: LR range test, cyclical learning rates and MLflow tracking, for any model.

    lr_find(model, optimizer, loader, ...)            -> RangeTestResult (bounds, plot, MLflow run)
    clr_scheduler(optimizer, policy, base_lr, max_lr, step_size=...) -> torch LRScheduler
    IterationLogger(run_id=None, prefix="", log_every=1)  -> buffered per-iteration metrics
"""
from clr_mlflow.api.finder import lr_find
from clr_mlflow.core.range_test import RangeTestResult
from clr_mlflow.core.schedules import clr_scheduler
from clr_mlflow.tracking.iteration_logger import IterationLogger

__version__ = "0.1.0"
__all__ = ["lr_find", "clr_scheduler", "IterationLogger", "RangeTestResult"]
