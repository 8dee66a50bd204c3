"""The training loop, generic over the step (steps.py): one scheduler step per iteration,
evaluation after every pass over the loader."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .curve import EMASmoother
from .engine import NullSink, Sink
from .steps import Evaluator, Stepper, evaluate

# Losses reach the host every SYNC_EVERY iterations (one GPU sync per chunk, not per step).
SYNC_EVERY = 64


class TrainingDiverged(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainResult:
    epochs: pd.DataFrame   # epoch, step, train_loss, train_accuracy, val_loss, val_accuracy
    lrs: np.ndarray        # the lr used at every iteration
    losses: np.ndarray     # raw training loss of every iteration
    smoothed: np.ndarray
    seconds: float

    def to_frame(self) -> pd.DataFrame:
        """One row per iteration: iteration, lr, loss, smoothed_loss."""
        return pd.DataFrame({"iteration": np.arange(len(self.lrs)), "lr": self.lrs, "loss": self.losses,
                             "smoothed_loss": self.smoothed})

    @property
    def final_accuracy(self) -> float:
        """Validation accuracy after the last epoch."""
        return float(self.epochs["val_accuracy"].iloc[-1])

    @property
    def best_accuracy(self) -> float:
        return float(self.epochs["val_accuracy"].max())


def train(stepper: Stepper, scheduler, loader: Iterable, total_iters: int, *, val_loader: Iterable,
          evaluator: Evaluator, beta: float = 0.98, sink: Sink = NullSink(), sync_every: int = SYNC_EVERY,
          progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train for `total_iters` optimizer steps, one scheduler step each, evaluating after
    every pass over `loader`. Epoch metrics are logged at the step of the epoch's last
    iteration, so they line up with the per-iteration series."""
    start_time = time.perf_counter()
    model, optimizer = stepper.model, stepper.optimizer
    smoother = EMASmoother(beta)
    buf = torch.empty(sync_every, device=stepper.device)
    lrs, losses, smoothed_all = np.empty(total_iters), np.empty(total_iters), np.empty(total_iters)
    take_accuracy = getattr(stepper.loss_fn, "take_accuracy", None)  # the default loss counts hits
    rows = []
    t, done = 0, 0  # t: iterations run; done: iterations already sent to the sink

    def drain() -> None:
        nonlocal done
        raw = buf[: t - done].double().cpu().numpy()
        smoothed = smoother.update(raw)
        losses[done:t], smoothed_all[done:t] = raw, smoothed
        first, done = done, t  # before the sink: a sink error must not make the error path send it again
        sink.series(np.arange(first, t), {"train/lr": lrs[first:t], "train/loss": raw,
                                          "train/smoothed_loss": smoothed})
        bad = np.flatnonzero(~np.isfinite(raw))
        if len(bad):
            raise TrainingDiverged(f"training loss is not finite ({raw[bad[0]]}) at iteration {first + bad[0]}: "
                                   "lower max_lr")

    model.train()
    if take_accuracy:
        take_accuracy()  # forget what the range test counted
    try:
        with tqdm(total=total_iters, desc="train", unit="it", leave=False, disable=not progress) as bar:
            epoch = 0
            while t < total_iters:
                loss_sum = torch.zeros((), device=stepper.device)
                epoch_start = t
                for batch in loader:
                    lrs[t] = optimizer.param_groups[0]["lr"]
                    loss, _, _ = stepper.step([batch])
                    buf[t - done] = loss
                    loss_sum += loss
                    scheduler.step()
                    t += 1
                    if t - done == sync_every:
                        drain()
                        bar.update(sync_every)
                    if t == total_iters:
                        break
                if t == epoch_start:
                    raise ValueError("Expected the training loader to yield batches, but it yielded none")
                bar.update(t - done)
                drain()
                held_out = evaluate(evaluator, model, val_loader)
                row = {"epoch": epoch, "step": t - 1, "train_loss": loss_sum.item() / (t - epoch_start),
                       "train_accuracy": take_accuracy() if take_accuracy else None,
                       "val_loss": held_out.get("val_loss"), "val_accuracy": held_out["accuracy"]}
                rows.append(row)
                values = {"val/loss": row["val_loss"], "val/accuracy": row["val_accuracy"],
                          "train/epoch_loss": row["train_loss"], "train/epoch_accuracy": row["train_accuracy"]}
                sink.points([t - 1], {k: [v] for k, v in values.items() if v is not None})
                if on_epoch is not None:  # e.g. a sweep reporting to Ray Tune's scheduler
                    on_epoch(row)
                bar.set_postfix(epoch=epoch, val_acc=f"{row['val_accuracy']:.3f}")
                epoch += 1
    except BaseException:
        # An error or Ctrl-C mid-chunk: the losses still on the device reach the sink first.
        if t > done:
            with contextlib.suppress(TrainingDiverged):
                drain()
        raise
    return TrainResult(pd.DataFrame(rows), lrs, losses, smoothed_all, time.perf_counter() - start_time)
