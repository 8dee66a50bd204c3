"""The training loop: one scheduler step per iteration, evaluation after every epoch."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .batches import Batches
from .curve import EMASmoother
from .engine import NullSink, Sink, evaluate, train_step

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
        return float(self.epochs["val_accuracy"].iloc[-1])

    @property
    def best_accuracy(self) -> float:
        return float(self.epochs["val_accuracy"].max())


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Batches, held_out: Batches,
          total_iters: int, *, beta: float = 0.98, sink: Sink = NullSink(), sync_every: int = SYNC_EVERY) -> TrainResult:
    """Train for `total_iters` iterations; epoch metrics are logged at the step of the
    epoch's last iteration, so they line up with the per-iteration series."""
    start_time = time.perf_counter()
    smoother = EMASmoother(beta)
    buf = torch.empty(sync_every, device=batches.device)
    lrs, losses, smoothed_all = np.empty(total_iters), np.empty(total_iters), np.empty(total_iters)
    rows = []
    t, done = 0, 0  # t: iterations run; done: iterations already sent to the sink

    def drain() -> None:
        nonlocal done
        raw = buf[: t - done].double().cpu().numpy()
        smoothed = smoother.update(raw)
        losses[done:t], smoothed_all[done:t] = raw, smoothed
        steps = np.arange(done, t)
        sink.series(steps, {"train/lr": lrs[done:t], "train/loss": raw, "train/smoothed_loss": smoothed})
        bad = np.flatnonzero(~np.isfinite(raw))
        if len(bad):
            raise TrainingDiverged(f"training loss is not finite ({raw[bad[0]]}) at iteration {done + bad[0]}: "
                                   "lower max_lr")
        done = t

    model.train()
    with tqdm(total=total_iters, desc="train", unit="it", leave=False) as bar:
        epoch = 0
        while t < total_iters:
            loss_sum = torch.zeros((), device=batches.device)
            correct = torch.zeros((), device=batches.device, dtype=torch.long)
            seen = 0
            for x, y in batches.epoch():
                lrs[t] = optimizer.param_groups[0]["lr"]
                loss, right = train_step(model, optimizer, x, y)
                buf[t - done] = loss
                loss_sum += loss * len(y)
                correct += right
                seen += len(y)
                scheduler.step()
                t += 1
                if t - done == sync_every:
                    drain()
                    bar.update(sync_every)
                if t == total_iters:
                    break
            bar.update(t - done)
            drain()
            val_loss, val_acc = evaluate(model, held_out)
            row = {"epoch": epoch, "step": t - 1, "train_loss": loss_sum.item() / seen,
                   "train_accuracy": correct.item() / seen, "val_loss": val_loss, "val_accuracy": val_acc}
            rows.append(row)
            sink.points([t - 1], {"val/loss": [val_loss], "val/accuracy": [val_acc],
                                  "train/epoch_loss": [row["train_loss"]],
                                  "train/epoch_accuracy": [row["train_accuracy"]]})
            bar.set_postfix(epoch=epoch, val_acc=f"{val_acc:.3f}")
            epoch += 1
    return TrainResult(pd.DataFrame(rows), lrs, losses, smoothed_all, time.perf_counter() - start_time)
