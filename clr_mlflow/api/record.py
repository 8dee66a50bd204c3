"""What an `lr_find` run records in MLflow, so runs can be compared later: the settings under
the API's own names (`range_test.<argument>`), what was tested (optimizer, each param
group's starting lr, model class and size, device, amp, loss), provenance tags, every
rule's answer as a metric, the curve, the bounds table and the figure.

Imported by lr_find only when tracking is asked for: this is where mlflow comes in.
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch
from torch import nn

from clr_mlflow.core.range_test import RangeTestResult
from clr_mlflow.tracking import runs as tracking
from clr_mlflow.tracking.iteration_logger import IterationLogger

PREFIX = "range_test."   # params: the UI groups them, and a user's own `num_iters` never clashes


def loss_name(loss_fn) -> str:
    """A readable name for the loss: a function's qualified name, else its class's."""
    name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__qualname__
    return name if name != "<lambda>" else f"lambda in {getattr(loss_fn, '__module__', '?')}"


def describe(settings: dict, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, device: torch.device,
             amp: torch.dtype | None) -> dict[str, str]:
    """The run's params: lr_find's arguments and what they were applied to."""
    base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    described = settings | {
        "optimizer": type(optimizer).__name__,
        "optimizer.lrs": ",".join(f"{g['lr']:g}" for g in optimizer.param_groups),
        "model": type(base).__name__,
        "model.parameters": sum(p.numel() for p in base.parameters()),
        "device": str(device),
        "amp": str(amp).removeprefix("torch.") if amp is not None else "none",
        "loss_fn": loss_name(loss_fn),
    }
    return {PREFIX + k: str(v) for k, v in described.items()}


def open_run(stack: ExitStack, settings: dict, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn,
             device: torch.device, amp: torch.dtype | None, log_every: int) -> tuple[str, IterationLogger]:
    """The run to log into (the caller's, or a new or child run: tracking.run_scope), with
    its params and tags written, and the logger of the curve. Both close with `stack`."""
    params = describe(settings, model, optimizer, loss_fn, device, amp)
    tags = {"clr_mlflow.kind": "range_test"} | tracking.provenance_tags(str(device))
    run_id = stack.enter_context(tracking.run_scope(tags, params=params, taken_by="range_test/lr"))
    tracking.log_params(params, run_id=run_id)
    return run_id, stack.enter_context(IterationLogger(run_id, log_every=log_every))


def summary_metrics(result: RangeTestResult) -> dict[str, float]:
    """The numbers to chart across runs: length, minimum, the chosen bounds, and every
    rule's bounds (`bounds/<rule>/max_lr`, `bounds/<rule>/base_lr`) where it gave some."""
    out = {"range_test/iterations": len(result.lrs), "range_test/skipped_steps": result.skipped_steps}
    if len(result.smoothed) and np.isfinite(result.smoothed).any():
        low = int(np.nanargmin(result.smoothed))
        out |= {"range_test/min_smoothed_loss": float(result.smoothed[low]),
                "range_test/lr_at_min": float(result.lrs[low])}
    for row in result.bounds.itertuples():
        if np.isfinite(row.base_lr) and np.isfinite(row.max_lr):
            out |= {f"bounds/{row.rule}/base_lr": float(row.base_lr), f"bounds/{row.rule}/max_lr": float(row.max_lr)}
            if row.selected:
                out |= {"bounds/base_lr": float(row.base_lr), "bounds/max_lr": float(row.max_lr)}
    return out


def log_result(run_id: str, result: RangeTestResult) -> None:
    """The range test's artifacts, tags and summary metrics, into `run_id`."""
    tracking.log_table(result.bounds, tracking.BOUNDS_TABLE, run_id=run_id)
    tracking.log_frame_csv(result.curves(), "range_test/curve.csv", run_id=run_id)
    tracking.log_figure(result.plot(), "range_test/curve.png", run_id=run_id)
    tracking.set_tags({"bounds_rule": result.bounds_rule, "range_test.stop_reason": result.stop_reason}, run_id=run_id)
    tracking.log_metrics(summary_metrics(result), run_id=run_id)
