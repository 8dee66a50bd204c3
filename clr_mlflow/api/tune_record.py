"""What `tune_bounds` records: a child run per candidate, and the parent's record (what
lr_find would have logged, the candidates' table, the winner). Imported only when tracking
is asked for: mlflow comes in here."""
from __future__ import annotations

import numpy as np
from torch import nn

from typing import TYPE_CHECKING

from clr_mlflow.api import record
from clr_mlflow.api.tune_train import Setup, _outcome
from clr_mlflow.tracking import runs as tracking
from clr_mlflow.tracking.iteration_logger import IterationLogger

if TYPE_CHECKING:
    from clr_mlflow.api.tune import TunedBounds

OUTCOME = "clr_mlflow.tune.outcome"  # of a candidate's run: finished, diverged or early_stopped


def _log_candidate(parent: str, rules: list[str], bounds: tuple, setup: Setup, done: dict) -> str:
    """One child run of `parent` for one candidate's bounds (every seed's training in it)."""
    (lo, hi), outs = bounds, list(done.values())
    outcome = _outcome(outs)
    tags = {"clr_mlflow.kind": "train", "bounds_rule": rules[0], "policy": setup.policy, OUTCOME: outcome}
    errors = [o.error for o in outs if o.error]
    if errors:
        tags["clr_mlflow.error"] = errors[0][:5000]
    name = f"tune {'+'.join(rules)} {setup.policy}"
    with tracking.child_run(parent, tags, run_name=name) as run_id:
        tracking.log_params({"bounds_rule": ",".join(rules), "base_lr": lo, "max_lr": hi, "policy": setup.policy,
                             "iterations": setup.steps, "seeds": ",".join(str(k[2]) for k in done),
                             "bounds_source": f"run:{parent} rule:{rules[0]}"}, run_id=run_id)
        first = outs[0]  # the first seed's series; the metric is the mean over seeds
        with IterationLogger(run_id) as sink:
            if first.lrs is not None:
                sink.series(np.arange(len(first.lrs)), {"train/lr": first.lrs, "train/loss": first.losses})
            if first.epochs:
                sink.points([e["step"] for e in first.epochs], {"val/accuracy": [e["val_accuracy"]
                                                                                  for e in first.epochs]})
        metrics = {"bounds/base_lr": lo, "bounds/max_lr": hi}
        if outcome == "finished":
            metrics["tune/metric"] = float(np.mean([o.metric for o in outs]))
        tracking.log_metrics(metrics, run_id=run_id)
    return run_id


def record_tuned(run_id: str, tuned: TunedBounds, settings: dict, model: nn.Module, optimizer, loss_fn, device,
                 amp, log_every: int = 1) -> None:
    """The parent's record: what lr_find would have logged (params, series, bounds table with
    the winner selected, curve, figure), and the candidates' table, the winner and its metric."""
    found = tuned.range_test
    tracking.log_params(record.describe(settings | {"bounds_rule": "tuned"}, model, optimizer, loss_fn, device, amp),
                        run_id=run_id)
    with IterationLogger(run_id, log_every=log_every) as sink:
        steps = np.arange(len(found.lrs))
        sink.series(steps, {"range_test/lr": found.lrs, "range_test/loss": found.losses,
                            "range_test/smoothed_loss": found.smoothed}
                    | {f"range_test/loss/{k}": v for k, v in found.terms.items()})
        for r in found.seed_results:
            sink.series(np.arange(len(r.smoothed)), {f"range_test/seed{r.seed}/smoothed_loss": r.smoothed})
        if len(found.eval_steps):
            sink.points(found.eval_steps, {"range_test/accuracy": found.accuracies})
    record.log_result(run_id, found)
    tracking.log_table(tuned.table, "tune/candidates.json", run_id=run_id)
    tracking.log_frame_csv(tuned.table, "tune/candidates.csv", run_id=run_id)
    tracking.set_tags({"tune.rule": tuned.rule or "none"}, run_id=run_id)
    if tuned.rule:
        tracking.log_metrics({"tune/metric": tuned.metric}, run_id=run_id)
