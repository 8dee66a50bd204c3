"""clr_mlflow: LR range test, cyclical learning rates and MLflow tracking, for any model.

    lr_find(model, optimizer, loader, ...)            -> RangeTestResult (bounds, plot, MLflow run)
    clr_scheduler(optimizer, policy, base_lr, max_lr, step_size=...) -> torch LRScheduler
    tune_bounds(make_model, make_optimizer, loader, val_loader, ...) -> TunedBounds (the rule that trains best)
    IterationLogger(run_id=None, prefix="", log_every=1)  -> buffered per-iteration metrics

`import clr_mlflow` loads none of them: each name is imported on first use (PEP 562), so a
program that imports us pays for torch only when it uses the scheduler, and for mlflow,
pandas and matplotlib only when it tracks or tabulates (docs/BENCHMARKS.md, import time).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and the API reference; at run time see __getattr__
    from clr_mlflow.api.finder import lr_find
    from clr_mlflow.api.tune import TunedBounds, tune_bounds
    from clr_mlflow.core.range_result import RangeTestResult
    from clr_mlflow.core.schedules import clr_scheduler
    from clr_mlflow.tracking.iteration_logger import IterationLogger

from clr_mlflow.version import __version__  # noqa: F401 - re-exported
__all__ = ["lr_find", "clr_scheduler", "IterationLogger", "RangeTestResult", "tune_bounds", "TunedBounds"]

_WHERE = {
    "lr_find": "clr_mlflow.api.finder",
    "tune_bounds": "clr_mlflow.api.tune",
    "TunedBounds": "clr_mlflow.api.tune",
    "RangeTestResult": "clr_mlflow.core.range_result",
    "clr_scheduler": "clr_mlflow.core.schedules",
    "IterationLogger": "clr_mlflow.tracking.iteration_logger",
}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'clr_mlflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
