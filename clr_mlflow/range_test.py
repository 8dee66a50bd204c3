"""The LR range test loop: raise the lr every optimizer step, record the loss, stop when it
diverges. Generic over the step (any model, batch and loss, see steps.py); model,
optimizer, data order and RNGs are put back afterwards."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .bounds import bounds_frame, suggest_bounds
from .curve import DivergenceRule, EMASmoother
from .engine import NullSink, Sink, Snapshot
from .steps import Evaluator, Stepper, cycle, evaluate

# Losses come to the host every SYNC_EVERY steps: the divergence stop then reacts at most
# SYNC_EVERY - 1 steps late. The recorded curve is the same for any value (it is cut at the
# first bad step and the weights are restored), only a little work is wasted.
SYNC_EVERY = 8


@dataclass(frozen=True)
class RangeTestResult:
    """One range test: per optimizer step the lr (of param group 0), the raw and smoothed
    loss and each named loss term; held-out evaluations; and, once `with_bounds` has run,
    the bounds table."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    eval_steps: np.ndarray   # steps after which held-out data was evaluated
    accuracies: np.ndarray   # accuracy, or the user's metric_fn
    val_losses: np.ndarray   # NaN where the evaluator gives no loss
    planned_iters: int
    stop_reason: str
    terms: dict[str, np.ndarray] = field(default_factory=dict)  # loss/<name> of a dict loss
    skipped_steps: int = 0   # steps a GradScaler skipped (inf/NaN gradients); not on the curve
    sweep: str = "exp"
    bounds: pd.DataFrame | None = None  # rule, base_lr, max_lr, selected, note
    bounds_rule: str = ""
    run_id: str | None = None
    seed: int = 0            # which of several seeds' tests this is (see seeds.py)
    seed_results: tuple["RangeTestResult", ...] = ()  # every seed's result, when there were several

    @property
    def eval_lrs(self) -> np.ndarray:
        return self.lrs[self.eval_steps]

    def to_frame(self) -> pd.DataFrame:
        """One row per step: seed, iteration, lr, loss, smoothed_loss, loss/<term>...,
        accuracy and val_loss (NaN where not evaluated)."""
        df = pd.DataFrame({"seed": self.seed, "iteration": np.arange(len(self.lrs)), "lr": self.lrs,
                           "loss": self.losses,
                           "smoothed_loss": self.smoothed} | {f"loss/{k}": v for k, v in self.terms.items()})
        df["accuracy"] = np.nan
        df["val_loss"] = np.nan
        df.loc[self.eval_steps, "accuracy"] = self.accuracies
        df.loc[self.eval_steps, "val_loss"] = self.val_losses
        return df

    def curves(self) -> pd.DataFrame:
        """`to_frame()` of every seed's test, one after another (the seed column tells them
        apart); this result's own frame when there was one seed."""
        return pd.concat([r.to_frame() for r in self.seed_results], ignore_index=True) if self.seed_results \
            else self.to_frame()

    def with_bounds(self, rule: str, divisor: float = 4.0) -> "RangeTestResult":
        """This result with the bounds table of every rule, `rule` marked as selected."""
        suggestions = suggest_bounds(self.lrs, self.smoothed, self.eval_lrs, self.accuracies, divisor)
        return dataclasses.replace(self, bounds=bounds_frame(suggestions, rule), bounds_rule=rule)

    def suggest(self, rule: str | None = None) -> tuple[float, float]:
        """(base_lr, max_lr) of `rule` (default: the selected rule); ValueError with the
        rule's note when it found none on this curve."""
        if self.bounds is None:
            raise ValueError("Expected a result with bounds (see with_bounds), but this one has none")
        rule = rule or self.bounds_rule
        rows = self.bounds[self.bounds["rule"] == rule]
        if rows.empty:
            raise ValueError(f"Expected rule to be one of {', '.join(self.bounds['rule'])}, but got {rule!r}")
        row = rows.iloc[0]
        if not (np.isfinite(row["base_lr"]) and np.isfinite(row["max_lr"])):
            raise ValueError(f"rule {rule} gave no bounds on this curve: {row['note']}")
        return float(row["base_lr"]), float(row["max_lr"])

    def plot(self):
        """The range-test figure (loss and smoothed loss vs lr, the bounds of every rule),
        the same as the run's range_test/curve.png."""
        from .plots import range_test_figure

        bounds = self.bounds if self.bounds is not None else pd.DataFrame(
            columns=["rule", "base_lr", "max_lr", "selected", "note"])
        return range_test_figure(self.to_frame(), bounds, log_x=self.sweep == "exp")


def range_test(stepper: Stepper, loader: Iterable, lrs: np.ndarray, *, accumulate: int = 1, beta: float = 0.98,
               diverge: float = 4.0, val_loader: Iterable | None = None, evaluator: Evaluator | None = None,
               eval_every: int = 0, sink: Sink = NullSink(), prefix: str = "range_test/",
               sync_every: int = SYNC_EVERY, sweep: str = "exp", progress: bool = True) -> RangeTestResult:
    """One optimizer step (of `accumulate` batches) per lr in `lrs`. Param group g runs at
    lrs[i] * lr_g / lr_0, so discriminative lrs keep their ratios. Model, optimizer, data
    order and RNGs are restored afterwards, also when the loop raises."""
    model, optimizer = stepper.model, stepper.optimizer
    snapshot = Snapshot(model, optimizer, loader, *([val_loader] if val_loader is not None else []),
                        scaler=stepper.scaler)
    ratios = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    smoother, rule = EMASmoother(beta), DivergenceRule(diverge)
    device = stepper.device
    buf = torch.empty(sync_every, device=device)
    term_bufs: dict[str, torch.Tensor] = {}
    kept: dict[str, list[np.ndarray]] = {"loss": [], "smoothed": []}
    kept_terms: dict[str, list[np.ndarray]] = {}
    evals: list[tuple[int, float, float]] = []
    skipped, i = 0, 0
    reason = "reached lr_end without diverging"
    model.train()
    try:
        stream = cycle(loader)
        with tqdm(total=len(lrs), desc="range test", unit="it", leave=False, disable=not progress) as bar:
            while i < len(lrs):
                start, n = i, 0
                chunk_evals = []
                while n < sync_every and i < len(lrs):
                    for group, ratio in zip(optimizer.param_groups, ratios):
                        group["lr"] = float(lrs[i]) * ratio
                    loss, terms, was_skipped = stepper.step([next(stream) for _ in range(accumulate)])
                    if was_skipped:  # a GradScaler step: the weights did not move, so neither does the sweep
                        skipped += 1
                        if skipped > len(lrs):
                            raise RuntimeError(f"GradScaler skipped {skipped} steps in a row of {len(lrs)}: "
                                               "gradients are not finite at any scale")
                        continue
                    buf[n] = loss
                    for name, value in terms.items():
                        if name not in term_bufs:
                            term_bufs[name] = torch.full((sync_every,), float("nan"), device=device)
                            kept_terms[name] = [np.full(i, np.nan)]
                        term_bufs[name][n] = value
                    n += 1
                    i += 1
                    if val_loader is not None and eval_every and i % eval_every == 0:
                        result = evaluate(evaluator, model, val_loader)
                        chunk_evals.append((i - 1, result["accuracy"], result.get("val_loss", np.nan)))
                raw = buf[:n].double().cpu().numpy()
                smoothed = smoother.update(raw)
                bad = rule.first_stop(raw, smoothed, start)
                keep = n if bad is None else bad + 1
                kept["loss"].append(raw[:keep])
                kept["smoothed"].append(smoothed[:keep])
                term_values = {}
                for name, tb in term_bufs.items():
                    term_values[name] = tb[:keep].double().cpu().numpy()
                    kept_terms[name].append(term_values[name])
                    tb.fill_(float("nan"))
                chunk_evals = [e for e in chunk_evals if e[0] < start + keep]
                evals += chunk_evals
                steps = np.arange(start, start + keep)
                sink.series(steps, {prefix + "lr": lrs[start:start + keep], prefix + "loss": raw[:keep],
                                    prefix + "smoothed_loss": smoothed[:keep]}
                            | {f"{prefix}loss/{k}": v for k, v in term_values.items()})
                if chunk_evals:
                    e = np.array(chunk_evals)
                    values = {prefix + "accuracy": e[:, 1]}
                    if np.isfinite(e[:, 2]).any():  # a user's metric_fn gives no loss
                        values[prefix + "val_loss"] = e[:, 2]
                    sink.points(e[:, 0].astype(int), values)
                bar.update(keep)
                if bad is not None:
                    reason = rule.reason
                    break
    finally:
        snapshot.restore()
    losses = np.concatenate(kept["loss"]) if kept["loss"] else np.empty(0)
    e = np.array(evals).reshape(-1, 3)
    return RangeTestResult(
        lrs=np.asarray(lrs[: len(losses)], dtype=np.float64), losses=losses,
        smoothed=np.concatenate(kept["smoothed"]) if kept["smoothed"] else np.empty(0),
        eval_steps=e[:, 0].astype(int), accuracies=e[:, 1], val_losses=e[:, 2],
        planned_iters=len(lrs), stop_reason=reason,
        terms={k: np.concatenate(v) for k, v in kept_terms.items()}, skipped_steps=skipped, sweep=sweep,
    )
