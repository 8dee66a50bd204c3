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


class _Curve:
    """The curve as the loop makes it: each step's losses wait on the device; `flush`
    brings the pending chunk to the host, smooths it, cuts it at the first step that trips
    the stop rule, keeps it and reports it to the sink."""

    def __init__(self, lrs: np.ndarray, sync_every: int, device: torch.device, beta: float, diverge: float,
                 sink: Sink, prefix: str):
        self.lrs, self.sink, self.prefix, self.device = lrs, sink, prefix, device
        self.smoother, self.rule = EMASmoother(beta), DivergenceRule(diverge)
        self.buf = torch.empty(sync_every, device=device)
        self.term_bufs: dict[str, torch.Tensor] = {}
        self.losses: list[np.ndarray] = []
        self.smoothed: list[np.ndarray] = []
        self.terms: dict[str, list[np.ndarray]] = {}
        self.evals: list[tuple[int, float, float]] = []
        self.pending_evals: list[tuple[int, float, float]] = []
        self.start, self.n = 0, 0     # the pending chunk: steps start .. start + n - 1
        self.stop_reason: str | None = None

    @property
    def next_step(self) -> int:
        return self.start + self.n

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        self.buf[self.n] = loss
        for name, value in terms.items():
            if name not in self.term_bufs:
                self.term_bufs[name] = torch.full(self.buf.shape, float("nan"), device=self.device)
                self.terms[name] = [np.full(self.next_step, np.nan)]
            self.term_bufs[name][self.n] = value
        self.n += 1

    def add_eval(self, step: int, values: dict[str, float]) -> None:
        self.pending_evals.append((step, values["accuracy"], values.get("val_loss", np.nan)))

    def flush(self) -> int:
        """Report the pending chunk; returns how many of its steps were kept."""
        start, n, p = self.start, self.n, self.prefix
        raw = self.buf[:n].double().cpu().numpy()
        smoothed = self.smoother.update(raw)
        bad = self.rule.first_stop(raw, smoothed, start)
        keep = n if bad is None else bad + 1
        if bad is not None:
            self.stop_reason = self.rule.reason
        self.losses.append(raw[:keep])
        self.smoothed.append(smoothed[:keep])
        terms = {}
        for name, tb in self.term_bufs.items():
            terms[name] = tb[:keep].double().cpu().numpy()
            self.terms[name].append(terms[name])
            tb.fill_(float("nan"))
        evals = [e for e in self.pending_evals if e[0] < start + keep]
        self.evals += evals
        self.pending_evals, self.start, self.n = [], start + n, 0
        self.sink.series(np.arange(start, start + keep),
                         {p + "lr": self.lrs[start:start + keep], p + "loss": raw[:keep],
                          p + "smoothed_loss": smoothed[:keep]} | {f"{p}loss/{k}": v for k, v in terms.items()})
        if evals:
            e = np.array(evals)
            values = {p + "accuracy": e[:, 1]}
            if np.isfinite(e[:, 2]).any():  # a user's metric_fn gives no loss
                values[p + "val_loss"] = e[:, 2]
            self.sink.points(e[:, 0].astype(int), values)
        return keep

    def result(self, **fields) -> RangeTestResult:
        losses = np.concatenate(self.losses) if self.losses else np.empty(0)
        e = np.array(self.evals).reshape(-1, 3)
        return RangeTestResult(
            lrs=np.asarray(self.lrs[: len(losses)], dtype=np.float64), losses=losses,
            smoothed=np.concatenate(self.smoothed) if self.smoothed else np.empty(0),
            eval_steps=e[:, 0].astype(int), accuracies=e[:, 1], val_losses=e[:, 2], planned_iters=len(self.lrs),
            stop_reason=self.stop_reason or "reached lr_end without diverging",
            terms={k: np.concatenate(v) for k, v in self.terms.items()}, **fields)


def range_test(stepper: Stepper, loader: Iterable, lrs: np.ndarray, *, accumulate: int = 1, beta: float = 0.98,
               diverge: float = 4.0, val_loader: Iterable | None = None, evaluator: Evaluator | None = None,
               eval_every: int = 0, sink: Sink = NullSink(), prefix: str = "range_test/",
               sync_every: int = SYNC_EVERY, sweep: str = "exp", progress: bool = True) -> RangeTestResult:
    """One optimizer step (of `accumulate` batches) per lr in `lrs`. Param group g runs at
    lrs[i] * lr_g / lr_0, so discriminative lrs keep their ratios. Model, optimizer, data
    order and RNGs are restored afterwards, also when the loop raises; what it measured
    before an error or Ctrl-C still reaches the sink."""
    model, optimizer = stepper.model, stepper.optimizer
    snapshot = Snapshot(model, optimizer, loader, *([val_loader] if val_loader is not None else []),
                        scaler=stepper.scaler)
    ratios = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    curve = _Curve(lrs, sync_every, stepper.device, beta, diverge, sink, prefix)
    skipped = 0
    model.train()
    try:
        stream = cycle(loader)
        with tqdm(total=len(lrs), desc="range test", unit="it", leave=False, disable=not progress) as bar:
            while curve.next_step < len(lrs) and curve.stop_reason is None:
                i = curve.next_step
                for group, ratio in zip(optimizer.param_groups, ratios):
                    group["lr"] = float(lrs[i]) * ratio
                loss, terms, was_skipped = stepper.step([next(stream) for _ in range(accumulate)])
                if was_skipped:  # a GradScaler step: the weights did not move, so neither does the sweep
                    skipped += 1
                    if skipped > len(lrs):
                        raise RuntimeError(f"GradScaler skipped {skipped} steps of {len(lrs)}: gradients are "
                                           "not finite at any scale")
                    continue
                curve.add(loss, terms)
                if val_loader is not None and eval_every and (i + 1) % eval_every == 0:
                    curve.add_eval(i, evaluate(evaluator, model, val_loader))
                if curve.n == sync_every or curve.next_step == len(lrs):
                    bar.update(curve.flush())
    except BaseException:
        if curve.n:  # an error or Ctrl-C mid-chunk: what the device holds is reported first
            curve.flush()
        raise
    finally:
        snapshot.restore()
    return curve.result(skipped_steps=skipped, sweep=sweep)
