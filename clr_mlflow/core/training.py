"""The training loop, generic over the step (steps.py): one scheduler step per iteration,
evaluation after every pass over the loader."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from clr_mlflow.core import checkpoint
from clr_mlflow.core.curve import EMASmoother
from clr_mlflow.core.engine import NullSink, Sink
from clr_mlflow.core.interrupts import StopRequested, held_signals
from clr_mlflow.core.steps import Evaluator, Stepper, evaluate

log = logging.getLogger(__name__)

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
          progress: bool = True, on_epoch: Callable[[dict], None] | None = None, checkpoint_every: int = 0,
          on_checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None) -> TrainResult:
    """Train for `total_iters` optimizer steps, one scheduler step each, evaluating after
    every pass over `loader`. Epoch metrics are logged at the step of the epoch's last
    iteration, so they line up with the per-iteration series.

    Checkpoints: with `on_checkpoint`, the whole state (`checkpoint_state`) is handed to it
    every `checkpoint_every` iterations (-1: at every epoch end), and when SIGINT / SIGTERM
    arrives (held until the iteration is whole; the signal is raised after). A sink that
    raises `StopRequested` (nowhere left to keep values) is handled like such a signal: the
    iteration is finished, a checkpoint written if the disk allows, then it is raised.
    `resume`: such a state, to continue from exactly where it was taken."""
    loop = _Loop(stepper, scheduler, loader, total_iters, beta, sink, sync_every)
    if resume is not None:
        loop.load(resume)
    model = stepper.model
    take_accuracy = getattr(stepper.loss_fn, "take_accuracy", None)  # the default loss counts hits
    if take_accuracy and resume is None:
        take_accuracy()  # forget what the range test counted
    every = checkpoint_every if on_checkpoint is not None else 0

    def checkpoint() -> None:
        nonlocal start_time
        loop.drain()  # the series the sink holds ends where the checkpoint does
        loop.seconds += time.perf_counter() - start_time
        start_time = time.perf_counter()
        if loop.stop is None:
            on_checkpoint(loop.state())
            return
        try:  # stopping for want of room: a checkpoint if any space allows, never a traceback
            on_checkpoint(loop.state())
        except OSError as e:
            log.warning(f"warning: no checkpoint written at iteration {loop.t} ({e})")

    def stop_if_asked() -> None:
        if loop.stop is not None:
            loop.stop.iteration = loop.t
            raise loop.stop

    model.train()
    start_time = time.perf_counter()
    try:
        with held_signals() as signal_held, tqdm(total=total_iters, initial=loop.t, desc="train", unit="it",
                                                  leave=False, disable=not progress) as bar:
            while loop.t < total_iters:
                batches = loop.start_epoch()
                for batch in batches:
                    loop.step(batch)
                    if loop.t - loop.done == sync_every:
                        loop.drain()
                        bar.update(sync_every)
                    if (every > 0 and loop.t % every == 0) or signal_held.pending or loop.stop:
                        if every:
                            bar.update(loop.t - loop.done)
                            checkpoint()
                        signal_held.deliver()
                        stop_if_asked()
                    if loop.t == total_iters:
                        break
                if loop.t == loop.epoch_start:
                    raise ValueError("Expected the training loader to yield batches, but it yielded none")
                bar.update(loop.t - loop.done)
                loop.drain()
                held_out = evaluate(evaluator, model, val_loader)
                row = {"epoch": loop.epoch, "step": loop.t - 1,
                       "train_loss": loop.loss_sum.item() / (loop.t - loop.epoch_start),
                       "train_accuracy": take_accuracy() if take_accuracy else None,
                       "val_loss": held_out.get("val_loss"), "val_accuracy": held_out["accuracy"]}
                loop.end_epoch(row)
                values = {"val/loss": row["val_loss"], "val/accuracy": row["val_accuracy"],
                          "train/epoch_loss": row["train_loss"], "train/epoch_accuracy": row["train_accuracy"]}
                loop.report([loop.t - 1], {k: [v] for k, v in values.items() if v is not None}, points=True)
                if on_epoch is not None:  # e.g. a sweep reporting to Ray Tune's scheduler
                    on_epoch(row)
                bar.set_postfix(epoch=row["epoch"], val_acc=f"{row['val_accuracy']:.3f}")
                loop.seconds += time.perf_counter() - start_time
                start_time = time.perf_counter()
                if every and (every < 0 or signal_held.pending or loop.stop):
                    checkpoint()
                signal_held.deliver()
                stop_if_asked()
    except BaseException:
        # An error or Ctrl-C mid-chunk: the losses still on the device reach the sink first.
        if loop.t > loop.done:
            with contextlib.suppress(TrainingDiverged):
                loop.drain()
        raise
    loop.seconds += time.perf_counter() - start_time
    t = loop.t
    return TrainResult(pd.DataFrame(loop.rows), loop.lrs[:t], loop.losses[:t], loop.smoothed[:t], loop.seconds)


class _Loop:
    """What the training loop carries from one iteration to the next, all of it in a
    checkpoint: position, the epoch's running sums, the series so far, the smoother."""

    def __init__(self, stepper: Stepper, scheduler, loader: Iterable, total_iters: int, beta: float, sink: Sink,
                 sync_every: int):
        self.stepper, self.scheduler, self.loader, self.sink = stepper, scheduler, loader, sink
        self.smoother = EMASmoother(beta)
        self.buf = torch.empty(sync_every, device=stepper.device)
        self.lrs, self.losses, self.smoothed = np.empty(total_iters), np.empty(total_iters), np.empty(total_iters)
        self.rows: list[dict] = []
        self.t = self.done = 0  # t: iterations run; done: iterations already sent to the sink
        self.epoch = self.epoch_start = 0
        self.loss_sum = torch.zeros((), device=stepper.device)
        self.epoch_rng: dict | None = None  # every RNG as the current epoch began (None: between epochs)
        self.resumed: Iterator | None = None  # a resumed epoch's batches, positioned
        self.seconds = 0.0
        self.stop: StopRequested | None = None  # a sink asked to stop: raised at the iteration's end

    def start_epoch(self) -> Iterator:
        if self.resumed is not None:
            batches, self.resumed = self.resumed, None
            return batches
        self.epoch_start, self.loss_sum = self.t, torch.zeros((), device=self.stepper.device)
        self.epoch_rng = checkpoint.rng_state(self.loader)
        return iter(self.loader)

    def step(self, batch) -> None:
        t = self.t
        self.lrs[t] = self.stepper.optimizer.param_groups[0]["lr"]
        loss, _, _ = self.stepper.step([batch])
        self.buf[t - self.done] = loss
        self.loss_sum += loss
        self.scheduler.step()
        self.t = t + 1

    def end_epoch(self, row: dict) -> None:
        self.rows.append(row)
        self.epoch += 1
        self.epoch_rng = None

    def drain(self) -> None:
        t, first = self.t, self.done
        raw = self.buf[: t - first].double().cpu().numpy()
        smoothed = self.smoother.update(raw)
        self.losses[first:t], self.smoothed[first:t] = raw, smoothed
        self.done = t  # before the sink: a sink error must not make the error path send it again
        self.report(np.arange(first, t), {"train/lr": self.lrs[first:t], "train/loss": raw,
                                          "train/smoothed_loss": smoothed})
        bad = np.flatnonzero(~np.isfinite(raw))
        if len(bad):
            raise TrainingDiverged(f"training loss is not finite ({raw[bad[0]]}) at iteration {first + bad[0]}: "
                                   "lower max_lr")

    def report(self, steps, values: dict, points: bool = False) -> None:
        """Values to the sink; a StopRequested it raises is kept for the iteration's end."""
        try:
            (self.sink.points if points else self.sink.series)(steps, values)
        except StopRequested as e:
            self.stop = self.stop or e

    def state(self) -> dict:
        """Everything to continue from here (after `drain`): see checkpoint.py."""
        t = self.t
        return {
            "steps": self.stepper.state_dict(),
            "scheduler": {"last_epoch": self.scheduler.last_epoch, "last_lr": self.scheduler.get_last_lr()},
            "rng": checkpoint.rng_state(self.loader), "epoch_rng": self.epoch_rng,
            "loop": {"t": t, "epoch": self.epoch, "epoch_start": self.epoch_start, "loss_sum": self.loss_sum,
                     "rows": self.rows, "seconds": self.seconds,
                     "smoother": {"avg": self.smoother.avg, "count": self.smoother.count},
                     "lrs": checkpoint.to_tensor(self.lrs[:t]), "losses": checkpoint.to_tensor(self.losses[:t]),
                     "smoothed": checkpoint.to_tensor(self.smoothed[:t])},
        }

    def load(self, state: dict) -> None:
        """Continue from `state`: weights, optimizer, schedule, series, and the data exactly
        where they were (the epoch's loader replayed from its start up to the position)."""
        self.stepper.load_state_dict(state["steps"])
        self.scheduler.last_epoch = state["scheduler"]["last_epoch"]
        self.scheduler._last_lr = list(state["scheduler"]["last_lr"])
        loop = state["loop"]
        t = self.t = self.done = loop["t"]
        self.epoch, self.epoch_start, self.rows, self.seconds = loop["epoch"], loop["epoch_start"], loop["rows"], \
            loop["seconds"]
        self.loss_sum = loop["loss_sum"].to(self.stepper.device)
        self.smoother.avg, self.smoother.count = loop["smoother"]["avg"], loop["smoother"]["count"]
        for name in ("lrs", "losses", "smoothed"):
            getattr(self, name)[:t] = loop[name].numpy()
        self.epoch_rng = state["epoch_rng"]
        if self.epoch_rng is not None:  # mid-epoch: the same order and augmentation, up to here
            checkpoint.set_rng_state(self.epoch_rng, self.loader)
            batches = iter(self.loader)
            for _ in range(t - self.epoch_start):
                next(batches)
            self.resumed = batches
        checkpoint.set_rng_state(state["rng"], self.loader)
