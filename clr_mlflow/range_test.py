"""The LR range test: raise the lr every batch, record the loss, stop when it diverges."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .batches import Batches
from .curve import DivergenceRule, EMASmoother
from .engine import NullSink, Sink, Snapshot, evaluate, train_step

# Losses come to the host every SYNC_EVERY iterations: the divergence stop then reacts at
# most SYNC_EVERY - 1 iterations late. The recorded curve is the same for any value (it is
# cut at the first bad iteration and the weights are restored), only a little work is wasted.
SYNC_EVERY = 8


@dataclass(frozen=True)
class RangeTestResult:
    lrs: np.ndarray        # lr of every iteration run and kept
    losses: np.ndarray     # raw training loss
    smoothed: np.ndarray   # debiased EMA of the loss
    eval_steps: np.ndarray  # iterations after which held-out data was evaluated
    accuracies: np.ndarray
    val_losses: np.ndarray
    planned_iters: int
    stop_reason: str

    @property
    def eval_lrs(self) -> np.ndarray:
        return self.lrs[self.eval_steps]

    def to_frame(self) -> pd.DataFrame:
        """One row per iteration; accuracy and val_loss are NaN where not evaluated."""
        df = pd.DataFrame({"iteration": np.arange(len(self.lrs)), "lr": self.lrs, "loss": self.losses,
                           "smoothed_loss": self.smoothed})
        df["accuracy"] = np.nan
        df["val_loss"] = np.nan
        df.loc[self.eval_steps, "accuracy"] = self.accuracies
        df.loc[self.eval_steps, "val_loss"] = self.val_losses
        return df


def range_test(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, lrs: np.ndarray, *,
               beta: float = 0.98, diverge: float = 4.0, held_out: Batches | None = None, eval_every: int = 0,
               sink: Sink = NullSink(), prefix: str = "range_test/", sync_every: int = SYNC_EVERY) -> RangeTestResult:
    """Run one optimizer step per lr in `lrs`; model, optimizer, data order and RNGs are
    restored afterwards, also when the loop raises."""
    snapshot = Snapshot(model, optimizer, batches)
    smoother, rule = EMASmoother(beta), DivergenceRule(diverge)
    kept_losses, kept_smoothed = [], []
    evals: list[tuple[int, float, float]] = []
    buf = torch.empty(sync_every, device=batches.device)
    stream = batches.forever()
    model.train()
    reason = f"completed {len(lrs)} iterations"
    try:
        with tqdm(total=len(lrs), desc="range test", unit="it", leave=False) as bar:
            for start in range(0, len(lrs), sync_every):
                stop_at = min(len(lrs), start + sync_every)
                chunk_evals = []
                for i in range(start, stop_at):
                    for group in optimizer.param_groups:
                        group["lr"] = float(lrs[i])
                    x, y = next(stream)
                    buf[i - start], _ = train_step(model, optimizer, x, y)
                    if held_out is not None and eval_every and (i + 1) % eval_every == 0:
                        val_loss, val_acc = evaluate(model, held_out)
                        chunk_evals.append((i, val_acc, val_loss))
                raw = buf[: stop_at - start].double().cpu().numpy()
                smoothed = smoother.update(raw)
                bad = rule.first_stop(raw, smoothed, start)
                n = len(raw) if bad is None else bad + 1
                last = start + n - 1
                chunk_evals = [e for e in chunk_evals if e[0] <= last]
                kept_losses.append(raw[:n])
                kept_smoothed.append(smoothed[:n])
                evals += chunk_evals
                steps = np.arange(start, start + n)
                sink.series(steps, {prefix + "lr": lrs[start:start + n], prefix + "loss": raw[:n],
                                    prefix + "smoothed_loss": smoothed[:n]})
                if chunk_evals:
                    e = np.array(chunk_evals)
                    sink.points(e[:, 0].astype(int), {prefix + "accuracy": e[:, 1], prefix + "val_loss": e[:, 2]})
                bar.update(n)
                if bad is not None:
                    reason = rule.reason
                    break
    finally:
        snapshot.restore()
    losses = np.concatenate(kept_losses) if kept_losses else np.empty(0)
    e = np.array(evals).reshape(-1, 3)
    return RangeTestResult(
        lrs=np.asarray(lrs[: len(losses)], dtype=np.float64), losses=losses,
        smoothed=np.concatenate(kept_smoothed) if kept_smoothed else np.empty(0),
        eval_steps=e[:, 0].astype(int), accuracies=e[:, 1], val_losses=e[:, 2],
        planned_iters=len(lrs), stop_reason=reason,
    )
