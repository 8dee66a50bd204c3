"""`lr_find`: the LR range test on any model, optimizer, loader and loss, with the bounds
table, plot and MLflow tracking. The CLI's range test is a call of this function.

A guest in the caller's program: everything it touches (weights, buffers, module modes,
grads, optimizer state, RNGs, the loader's order, a GradScaler) is put back, and MLflow is
only imported when tracking is asked for (record.py)."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from clr_mlflow.core import batched, distributed
from clr_mlflow.core.bounds import RULES, disagreement
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
    bounds_rule: str = "steepest",
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
    steps, recording the loss, until the smoothed loss (debiased EMA, `beta`) diverges or
    turns non-finite. Model, optimizer, data order and RNGs are restored bit for bit
    afterwards.

    Diverges means: the smoothed loss has climbed above its best by more than
    (`diverge` - 1) x the loss's own scale (the larger of how far it fell to its best and
    its step-to-step noise), so a loss that is negative or carries a constant is read like
    any other. Every argument, and the first batch through `loss_fn`, is checked before
    anything is stepped or logged (a one-shot iterator's first batch is not peeked at: its
    first step checks it, before the backward).

    Args:
        model: The `torch.nn.Module` to test, any model. It runs in training mode during
            the test; weights, buffers, module modes and grads are put back afterwards.
        optimizer: Any `torch.optim.Optimizer` over the model's parameters; its state is
            put back afterwards. Param groups are swept in proportion to their starting
            lrs (discriminative lrs keep their ratios); `lrs` and the bounds are param
            group 0's, whose starting lr must be positive.
        loader: Any iterable of batches (DataLoader, list, generator factory...): tuples,
            dicts, lists of images with target dicts, dataclasses; tensors are moved to
            `device` wherever they sit. A loader that ends before `num_iters` starts again
            (a DataLoader draws a new order).
        loss_fn: `loss_fn(model, batch)` returning a scalar loss, an output that carries a
            `loss` (a Hugging Face ModelOutput), or a dict of losses (summed; each term is
            tracked as `range_test/loss/<name>` and kept in the result's `terms`). Default
            (None): cross-entropy of `model(x)` vs `y` for `(x, y)` batches.
        num_iters: Optimizer steps in the sweep, an integer in [10, 10,000,000]; None
            means 100. A shorter loader starts again.
        start_lr: The first lr of the sweep (param group 0's), positive.
        end_lr: The last lr of the sweep, greater than `start_lr`.
        sweep: `"exp"` (lrs evenly spaced in log scale) or `"linear"`.
        beta: Smoothing of the debiased EMA of the loss, in [0, 1).
        diverge: The stop factor, greater than 1: the test stops once the smoothed loss
            is more than (`diverge` - 1) x the loss's scale above its best.
        accumulate: k batches per optimizer step; the lr changes per optimizer step and
            the curve has one point per optimizer step.
        scaler: A `torch.amp.GradScaler`: steps it skips (inf/NaN gradients) are counted
            (`skipped_steps`) and do not advance the sweep; its scale is put back
            afterwards.
        val_loader: Held-out batches: with `eval_every`, `metric_fn(model, val_loader)`
            is measured every `eval_every` steps, for the paper's accuracy-vs-lr test and
            `bounds_rule="accuracy"`. Give both `val_loader` and `eval_every`, or neither.
        eval_every: Optimizer steps between held-out evaluations; 0 (default) for none.
        metric_fn: `metric_fn(model, val_loader) -> float`, higher is better. Default
            (None): accuracy and loss of an `(x, y)` loader.
        bounds_rule: The rule whose bounds are selected (`suggest()`'s default): one of
            `min_div10`, `steepest`, `loss_edge`, `accuracy` (needs `eval_every`), `valley`,
            `slide`. The bounds table holds every rule's answer. Default `steepest`: the one
            rule that trained best or close to it in every model family of docs/RESULTS.md.
        bounds_divisor: The loss rules' base_lr is max_lr / `bounds_divisor`; greater
            than 1.
        seeds: K range tests, seed 0 the model as given, seeds 1..K-1 re-initialised
            (`reset_parameters()`) with new data orders; the bounds table gives per rule
            the median bounds over seeds with `max_lr_min`, `max_lr_max` and `seeds` (how
            many answered), and `seed_results` holds every seed's curve.
        batched_seeds: Run the seeds side by side as one batched model (torch.func.vmap;
            same curves up to float rounding) rather than one after another. None
            (default): batched on CUDA for models up to 5M parameters with SGD/Adam/AdamW
            and no val_loader or scaler, falling back when the first batched step fails (a
            loss dict, dropout...); True: batched on any device (on the CPU it measured
            slower: scripts/bench_seeds.py), or a ValueError; False: never.
        device: Where the batches' tensors go; default: the model's device.
        amp: A dtype such as `torch.bfloat16`: the forward pass runs under autocast in it.
            None (default): no autocast.
        track: Log into the active MLflow run, or a new one (`range_test/*` series, bounds
            table, curve.csv, curve.png). An active run that already holds a range test
            gets a child run for this one (nested), so two curves never interleave. False
            logs nothing (and needs no tracking store).
        log_every: Keep every `log_every`-th step of the tracked `range_test/*` series
            (the result keeps every step).
        progress: Show a progress bar.

    Returns:
        A RangeTestResult: `lrs`, `losses`, `smoothed`, `terms`, `to_frame()`, `bounds` (one
            row per rule), `suggest(rule=None) -> (base_lr, max_lr)`, `plot()`, and
            `run_id` (the MLflow run, None with `track=False`).

    Raises:
        ValueError: An argument out of range (one line naming it and what it must be), a
            loader that yields no batches, or `batched_seeds=True` where the seeds cannot
            run batched; raised before anything is stepped or logged.
        TypeError: A first batch the default loss cannot read, or a `loss_fn` whose output
            is no loss; raised before anything is stepped or logged.

    Examples:
        A classifier on `(x, y)` batches with the default cross-entropy (`track=False`
        keeps MLflow out of it; leave it out to record the test):

        >>> import torch
        >>> from clr_mlflow import lr_find
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> loader = [(x, x[:, :3].argmax(1)) for x in torch.randn(8, 16, 4)]   # (x, y) batches
        >>> before = [p.clone() for p in model.parameters()]
        >>> result = lr_find(model, optimizer, loader, end_lr=100, track=False, progress=False)
        >>> result.stop_reason.startswith("diverged")
        True
        >>> base_lr, max_lr = result.suggest()   # bounds_rule's, here steepest's
        >>> round(max_lr / base_lr, 6)           # bounds_divisor
        4.0
        >>> all(torch.equal(p, q) for p, q in zip(model.parameters(), before))   # put back
        True

        A loss dict: the terms are summed, and each is kept (and tracked) by name:

        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     out = model(x)
        ...     return {"ce": torch.nn.functional.cross_entropy(out, y), "l2": 1e-4 * out.pow(2).mean()}
        >>> result = lr_find(model, optimizer, loader, loss_fn=loss_fn, end_lr=100, track=False,
        ...                  progress=False)
        >>> sorted(result.terms)
        ['ce', 'l2']
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
    need(loss_fn is None or callable(loss_fn), "loss_fn", "None or a callable(model, batch) -> loss as", loss_fn)
    need(amp is None or isinstance(amp, torch.dtype), "amp", "None or a torch.dtype (e.g. torch.bfloat16) as", amp)
    need(isinstance(track, bool), "track", "True or False as", track)
    need(isinstance(progress, bool), "progress", "True or False as", progress)
    try:
        device = torch.device(device) if isinstance(device, str) else device
    except RuntimeError:
        pass  # not a device name: refused below
    need(device is None or isinstance(device, torch.device), "device", "None, a torch.device or a device name such "
         "as 'cpu' or 'cuda:0' as", device)
    need(device is None or device.type != "cuda" or torch.cuda.is_available(), "device", "an available device as",
         str(device))
    device = device or model_device(model)
    start_lr, end_lr = float(start_lr), float(end_lr)  # a NumPy scalar or tensor logs as a plain number
    first_lr = optimizer.param_groups[0]["lr"]
    need(is_finite(first_lr) and first_lr > 0, "optimizer.param_groups[0]['lr']",
         "positive (other groups are swept in proportion to it)", first_lr)
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
    if warning := disagreement(result.bounds):  # the selected row's note says it too
        logging.getLogger(__name__).warning("lr_find: %s", warning)
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
