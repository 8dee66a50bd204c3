"""`lr_find`: the LR range test on any model, optimizer, loader and loss, with the bounds
table, plot and MLflow tracking. The CLI's range test is a call of this function.

A guest in the caller's program: everything it touches (weights, buffers, module modes,
grads, optimizer state, RNGs, the loader's order, a GradScaler) is put back, and MLflow is
only imported when tracking is asked for (record.py)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from clr_mlflow.core import batched, distributed
from clr_mlflow.core.bounds import RULES
from clr_mlflow.core.checks import is_finite, is_int, need
from clr_mlflow.core.curve import SWEEPS, sweep_lrs
from clr_mlflow.core.engine import NullSink, Snapshot
from clr_mlflow.core.range_test import RangeTestResult, range_test
from clr_mlflow.core.seeds import combine, run_seeds
from clr_mlflow.core.steps import CrossEntropy, LossFn, Stepper, autocast, classification_eval, metric_eval, \
    model_device, to_device, total_loss

MIN_STEPS = 10           # fewer optimizer steps than this cannot show a curve
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
    need(is_int(num_iters, MIN_STEPS) and num_iters <= MAX_ITERS, "num_iters",
         f"integer in [{MIN_STEPS}, {MAX_ITERS:,}] (optimizer steps; a shorter loader starts again) for", num_iters)
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
    device = torch.device(device) if device is not None else model_device(model)
    loss_fn = loss_fn or CrossEntropy()
    _check_first_batch(model, optimizer, loader, loss_fn, device, amp, scaler)
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
            from clr_mlflow.api import record  # mlflow (~1 s to import) loads when tracking is asked for

            settings = dict(start_lr=start_lr, end_lr=end_lr, num_iters=num_iters, sweep=sweep, beta=beta,
                            diverge=diverge, accumulate=accumulate, eval_every=eval_every, bounds_rule=bounds_rule,
                            bounds_divisor=bounds_divisor, seeds=seeds)
            run_id, sink = record.open_run(stack, settings, model, optimizer, loss_fn, device, amp, log_every)

        def run_one(seed_sink) -> RangeTestResult:
            return range_test(stepper, loader, lrs, accumulate=accumulate, beta=beta, diverge=diverge,
                              val_loader=val_loader, evaluator=evaluator, eval_every=eval_every, sink=seed_sink,
                              sweep=sweep, progress=progress)

        loaders = [loader] + ([val_loader] if val_loader is not None else [])
        results = run_seeds(run_one, model, optimizer, loaders, seeds, sink, "range_test/", scaler, run_all)
        result = combine(results, bounds_rule, bounds_divisor)
        if track:
            sink.close()  # the curve is in MLflow before the artifacts (and before any training)
            record.log_result(run_id, result)
    return dataclasses.replace(result, run_id=run_id)


def _check_first_batch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable, loss_fn: LossFn,
                       device: torch.device, amp: torch.dtype | None, scaler) -> None:
    """Run the loss on the first batch, without gradients, before anything is stepped or
    logged: a batch the default loss cannot read, or a loss_fn whose output is no loss, is
    a one-line error now rather than a failure mid-run. Drawing the batch and the forward
    may move RNGs, the loader's order, BatchNorm statistics and a loss's counters: all are
    put back. A one-shot iterator is not peeked at (that would eat its first batch); its
    first step checks the same things before its backward."""
    if isinstance(loader, Iterator):
        return
    snapshot = Snapshot(model, optimizer, loader, scaler=scaler)  # before iter(): a DataLoader draws its seed there
    loss_state = loss_fn.state_dict() if hasattr(loss_fn, "state_dict") and hasattr(loss_fn, "load_state_dict") \
        else None
    try:
        first: Any = next(iter(loader), None)
        if first is None:
            raise ValueError("Expected loader to yield batches, but it yielded none")
        if not model.training:
            model.train()  # as the range test will run it
        with torch.no_grad(), autocast(device, amp):
            total_loss(loss_fn(model, to_device(first, device)))
    finally:
        snapshot.restore()
        if loss_state is not None:
            loss_fn.load_state_dict(loss_state)
