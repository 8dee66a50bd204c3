"""tune_bounds' candidates as Ray Tune trials: one per (base_lr, max_lr, seed), each reporting
its validation metric after every epoch, so that ASHA can stop the ones that trail."""
from __future__ import annotations

import logging
import math
import os
import tempfile

from collections.abc import Callable

import pandas as pd


def on_ray(setup, keys: list[tuple], asha: bool, cpus: float, max_concurrent: int | None,
           train_one: Callable) -> dict[tuple, dict]:
    """Every (base_lr, max_lr, seed) of `keys` as a Ray Tune trial running `train_one(setup,
    *key, on_epoch=...)` (tune.train_candidate; a local Ray started here when none runs, and
    shut down after); ASHA, when asked, stops trials that trail at an epoch's end. Per key:
    metric, outcome, error and epochs, as tune.Outcome takes them."""
    import ray
    from ray import tune

    # (no environment variable is set to quiet Tune's reporter: this is a library call in the
    # caller's process; verbose=0 below quiets what it can)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    try:
        stopper = None
        if asha:
            from ray.tune.schedulers import ASHAScheduler

            per_epoch = len(setup.loader) if hasattr(setup.loader, "__len__") else 0
            stopper = ASHAScheduler(metric="metric", mode="max", grace_period=1, reduction_factor=2,
                                    max_t=math.ceil(setup.steps / per_epoch) if per_epoch else 10**9)
        with tempfile.TemporaryDirectory(prefix="clr_mlflow_tune_") as storage:
            results = tune.Tuner(
                tune.with_resources(tune.with_parameters(_trial, setup=setup, train_one=train_one), {"cpu": cpus}),
                param_space={"key": tune.grid_search([list(k) for k in keys])},
                tune_config=tune.TuneConfig(scheduler=stopper, max_concurrent_trials=max_concurrent,
                                            reuse_actors=True),  # one process per slot, not per candidate
                run_config=tune.RunConfig(name="tune_bounds", storage_path=storage, verbose=0)).fit()
        done = {}
        for r in results:
            history = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
            epochs = [{"step": int(s), "val_accuracy": float(m)} for s, m in
                      zip(history.get("step", []), history.get("metric", []))]
            last = r.metrics or {}
            if r.error is not None:
                out = dict(outcome="failed", error=f"{type(r.error).__name__}: {r.error}")
            elif last.get("error"):
                out = dict(outcome="diverged", error=last["error"])
            elif last.get("final"):
                out = dict(metric=float(last["metric"]))
            else:
                out = dict(outcome="early_stopped")
            done[tuple(r.config["key"])] = out | {"epochs": epochs}
    finally:
        if started:
            ray.shutdown()
    return {k: done[k] for k in keys}


def _trial(config: dict, setup, train_one: Callable) -> None:
    """One candidate in Ray's worker: its metric to Tune after every epoch."""
    from ray import tune

    def report(row: dict) -> None:
        tune.report({"metric": float(row["val_accuracy"]), "step": int(row["step"]),
                     "final": int(row["step"]) + 1 >= setup.steps})

    out = train_one(setup, *config["key"], on_epoch=report)
    if out.outcome != "finished":
        tune.report({"metric": float("nan"), "final": True, "error": out.error})
