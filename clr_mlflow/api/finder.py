"""`lr_find`: the LR range test on any model, optimizer, loader and loss, with the bounds
table, plot and MLflow tracking. The CLI's range test is a call of this function."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from torch import nn

from clr_mlflow.core import batched
from clr_mlflow.core import distributed
from clr_mlflow.tracking import runs as tracking
from clr_mlflow.core.bounds import RULES
from clr_mlflow.core.checks import is_finite, is_int, need
from clr_mlflow.core.curve import SWEEPS, sweep_lrs
from clr_mlflow.core.engine import NullSink, Snapshot
from clr_mlflow.tracking.iteration_logger import IterationLogger
from clr_mlflow.core.range_test import RangeTestResult, range_test
from clr_mlflow.core.seeds import combine, run_seeds
from clr_mlflow.core.steps import CrossEntropy, LossFn, Stepper, classification_eval, inputs_and_targets, metric_eval, \
    model_device

MIN_STEPS = 10           # a loader shorter than this many optimizer steps cannot show a curve
MAX_ITERS = 10_000_000   # beyond any real range test: a typo, not a request
MAX_SEEDS = 1000


def lr_find(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    loss_fn: LossFn | None = None,
    num_iters: int | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    sweep: str = "exp",
    beta: float = 0.98,
    diverge: float = 4.0,
    accumulate: int = 1,
    scaler: torch.amp.GradScaler | None = None,
    val_loader: Iterable | None = None,
    eval_every: int = 0,
    metric_fn: Callable[[nn.Module, Iterable], float] | None = None,
    bounds_rule: str = "loss_edge",
    bounds_divisor: float = 4.0,
    seeds: int = 1,
    batched_seeds: bool | None = None,
    device: str | torch.device | None = None,
    amp: torch.dtype | None = None,
    track: bool = True,
    log_every: int = 1,
    progress: bool = True,
) -> RangeTestResult:
    """LR range test: raise the lr from `start_lr` to `end_lr` over `num_iters` optimizer
    steps (default 100), recording the loss, until the smoothed loss (debiased EMA, `beta`)
    exceeds `diverge` x its best or turns non-finite. Model, optimizer, data order and RNGs
    are restored bit for bit afterwards.

    - `loader`: any iterable of batches (DataLoader, list, generator factory...) — tuples,
      dicts, lists of images with target dicts; tensors are moved to `device` (default: the
      model's) wherever they sit. A loader that ends before `num_iters` starts again.
    - `loss_fn(model, batch)`: a scalar loss or a dict of losses (summed; each term is
      tracked as `range_test/loss/<name>`). Default: cross-entropy of `model(x)` vs `y`.
    - `accumulate=k`: k batches per optimizer step; the lr changes per optimizer step.
      With a `torch.amp.GradScaler` as `scaler`, steps it skips are counted
      (`skipped_steps`) and do not advance the sweep.
    - `val_loader` + `eval_every`: held-out `metric_fn(model, val_loader)` (default:
      accuracy and loss of an `(x, y)` loader) every `eval_every` steps, for the paper's
      accuracy-vs-lr test and `bounds_rule="accuracy"`.
    - Param groups are swept in proportion to their starting lrs; `lrs` and the bounds
      are param group 0's.
    - `seeds=K`: K range tests, seed 0 the model as given, seeds 1..K-1 re-initialised
      (`reset_parameters()`) with new data orders; the bounds table gives per rule the
      median bounds over seeds with `max_lr_min`, `max_lr_max` and `seeds` (how many
      answered), and `seed_results` holds every seed's curve. `batched_seeds`: run the seeds
      side by side as one batched model (torch.func.vmap; same curves up to float rounding)
      rather than one after another. None (default): batched on CUDA for models up to 5M
      parameters with SGD/Adam/AdamW and no val_loader or scaler, falling back when the
      first batched step fails (a loss dict, dropout...); True: batched on any device (on
      the CPU it measured slower: scripts/bench_seeds.py), or a ValueError; False: never.
    - `track`: log into the active MLflow run, or a new one (`range_test/*` series,
      bounds table, curve.csv, curve.png). An active run that already holds a range test
      gets a child run for this one (nested), so two curves never interleave.

    Returns a RangeTestResult: `lrs`, `losses`, `smoothed`, `to_frame()`, `bounds` (one row
    per rule), `suggest(rule=None) -> (base_lr, max_lr)`, `plot()`.

        result = clr_mlflow.lr_find(model, optimizer, loader, num_iters=200)
        base_lr, max_lr = result.suggest()
    """
    need(isinstance(model, nn.Module), "model", "a torch.nn.Module as", type(model).__name__)
    need(isinstance(optimizer, torch.optim.Optimizer), "optimizer", "a torch.optim.Optimizer as",
         type(optimizer).__name__)
    need(hasattr(loader, "__iter__"), "loader", "an iterable of batches as", type(loader).__name__)
    num_iters = 100 if num_iters is None else num_iters
    need(is_int(num_iters, 2) and num_iters <= MAX_ITERS, "num_iters", f"integer in [2, {MAX_ITERS:,}] for",
         num_iters)
    need(is_finite(start_lr) and start_lr > 0, "start_lr", "positive finite", start_lr)
    need(is_finite(end_lr) and end_lr > start_lr, "end_lr", f"finite value > start_lr={start_lr} for", end_lr)
    need(sweep in SWEEPS, "sweep", f"one of {', '.join(SWEEPS)} for", sweep)
    need(is_finite(beta) and 0 <= beta < 1, "beta", "value in [0, 1) for", beta)
    need(is_finite(diverge) and diverge > 1, "diverge", "finite value > 1 for", diverge)
    need(is_int(accumulate, 1), "accumulate", "positive integer", accumulate)
    need(is_int(eval_every, 0), "eval_every", "non-negative integer", eval_every)
    need(is_int(log_every, 1), "log_every", "positive integer", log_every)
    need(is_int(seeds, 1) and seeds <= MAX_SEEDS, "seeds", f"integer in [1, {MAX_SEEDS}] for", seeds)
    need(batched_seeds is None or isinstance(batched_seeds, bool), "batched_seeds", "None, True or False as",
         batched_seeds)
    need((val_loader is None) == (eval_every == 0), "eval_every" if val_loader is not None else "val_loader",
         "both val_loader and a positive eval_every, or neither, for", eval_every)
    need(metric_fn is None or callable(metric_fn), "metric_fn", "a callable(model, val_loader) -> float as",
         metric_fn)
    need(bounds_rule in RULES, "bounds_rule", f"one of {', '.join(RULES)} for", bounds_rule)
    need(bounds_rule != "accuracy" or eval_every > 0, "eval_every", "a positive (bounds_rule=accuracy needs it)",
         eval_every)
    need(is_finite(bounds_divisor) and bounds_divisor > 1, "bounds_divisor", "finite value > 1 for", bounds_divisor)
    need(scaler is None or isinstance(scaler, torch.amp.GradScaler), "scaler", "a torch.amp.GradScaler or None as",
         scaler)
    start_lr, end_lr = float(start_lr), float(end_lr)  # a NumPy scalar or tensor logs as a plain number
    first_lr = optimizer.param_groups[0]["lr"]
    need(is_finite(first_lr) and first_lr > 0, "optimizer.param_groups[0]['lr']",
         "positive (other groups are swept in proportion to it)", first_lr)
    if hasattr(loader, "__len__"):
        steps = len(loader) // accumulate
        need(steps >= MIN_STEPS, "loader", f"at least {MIN_STEPS} optimizer steps ({MIN_STEPS} x accumulate="
             f"{accumulate} batches) in", f"{len(loader)} batches")
    device = torch.device(device) if device is not None else model_device(model)
    if loss_fn is None:
        _check_default_batches(model, optimizer, loader)
    loss_fn = loss_fn or CrossEntropy()
    evaluator = metric_eval(metric_fn) if metric_fn is not None else classification_eval(device, amp)
    stepper = Stepper(model, optimizer, loss_fn, device, accumulate, scaler, amp)
    lrs = sweep_lrs(start_lr, end_lr, num_iters, sweep)
    run_all = batched.runner(batched_seeds, seeds, model, optimizer, loader, loss_fn, lrs, scaler=scaler,
                             val_loader=val_loader, device=device, accumulate=accumulate, amp=amp, beta=beta,
                             diverge=diverge, sweep=sweep, progress=progress)

    if distributed.active() and not distributed.is_leader():
        track = False  # under torchrun only rank 0 logs: one run, not one per rank
    with ExitStack() as stack:
        run_id, sink = None, NullSink()
        if track:
            run_id = stack.enter_context(tracking.run_scope({"clr_mlflow.kind": "range_test"},
                                                                  taken_by="range_test/lr"))
            tracking.log_params({"lr_start": start_lr, "lr_end": end_lr, "num_iters": num_iters, "sweep": sweep,
                                 "beta": beta, "diverge": diverge, "accumulate": accumulate,
                                 "eval_every": eval_every, "bounds_rule": bounds_rule,
                                 "bounds_divisor": bounds_divisor, "seeds": seeds})
            sink = stack.enter_context(IterationLogger(run_id, log_every=log_every))
        def run_one(seed_sink) -> RangeTestResult:
            return range_test(stepper, loader, lrs, accumulate=accumulate, beta=beta, diverge=diverge,
                              val_loader=val_loader, evaluator=evaluator, eval_every=eval_every, sink=seed_sink,
                              sweep=sweep, progress=progress)

        loaders = [loader] + ([val_loader] if val_loader is not None else [])
        results = run_seeds(run_one, model, optimizer, loaders, seeds, sink, "range_test/", scaler, run_all)
        result = combine(results, bounds_rule, bounds_divisor)
        if track:
            sink.close()  # the curve is in MLflow before the artifacts (and before any training)
            _log_result(result)
    return dataclasses.replace(result, run_id=run_id)


def _check_default_batches(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable) -> None:
    """The default loss needs `(x, y)` batches: look at the first one before anything runs
    (drawing it may advance RNGs and the loader's order, so they are put back). A one-shot
    iterator is not peeked at: that would eat its first batch."""
    snapshot = Snapshot(model, optimizer, loader)
    try:
        it = iter(loader)
        if it is loader:
            return
        first: Any = next(it, None)
        if first is None:
            raise ValueError("Expected loader to yield batches, but it yielded none")
        inputs_and_targets(first)
    finally:
        snapshot.restore()


def _log_result(result: RangeTestResult) -> None:
    """The range test's artifacts, tags and summary metrics, into the active run."""
    table = result.bounds
    tracking.log_table(table, tracking.BOUNDS_TABLE)
    tracking.log_frame_csv(result.curves(), "range_test/curve.csv")
    tracking.log_figure(result.plot(), "range_test/curve.png")
    tracking.set_tags({"bounds_rule": result.bounds_rule, "range_test.stop_reason": result.stop_reason})
    summary = {"range_test/iterations": len(result.lrs), "range_test/skipped_steps": result.skipped_steps}
    if len(result.smoothed) and np.isfinite(result.smoothed).any():
        low = int(np.nanargmin(result.smoothed))
        summary |= {"range_test/min_smoothed_loss": float(result.smoothed[low]),
                    "range_test/lr_at_min": float(result.lrs[low])}
    chosen = table[table["selected"]].iloc[0]
    if np.isfinite(chosen["base_lr"]) and np.isfinite(chosen["max_lr"]):
        summary |= {"bounds/base_lr": float(chosen["base_lr"]), "bounds/max_lr": float(chosen["max_lr"])}
    tracking.log_metrics(summary)
