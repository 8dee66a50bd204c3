"""The LR range test loop: raise the lr every optimizer step, record the loss, stop when it
diverges. Generic over the step (any model, batch and loss, see steps.py); model,
optimizer, data order and RNGs are put back afterwards."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from clr_mlflow.core.curve import DivergenceRule, EMASmoother
from clr_mlflow.core.engine import NullSink, Sink, Snapshot
from clr_mlflow.core.range_result import RangeTestResult
from clr_mlflow.core.steps import Evaluator, Stepper, cycle, evaluate

# Losses come to the host every SYNC_EVERY steps: the divergence stop then reacts at most
# SYNC_EVERY - 1 steps late. The recorded curve is the same for any value (it is cut at the
# first bad step and the weights are restored), only a little work is wasted.
SYNC_EVERY = 8


class _Column:
    """One curve of the loop: its smoother and stop rule, the steps it kept, and its sink.
    The loop has one column per model it steps: one, or one per seed (batched.py)."""

    def __init__(self, beta: float, diverge: float, sink: Sink):
        self.smoother, self.rule, self.sink = EMASmoother(beta), DivergenceRule(diverge, beta), sink
        self.losses: list[np.ndarray] = []
        self.smoothed: list[np.ndarray] = []
        self.terms: dict[str, list[np.ndarray]] = {}
        self.evals: list[tuple[int, float, float]] = []
        self.length = 0               # steps kept so far
        self.stop_reason: str | None = None

    def take(self, start: int, raw: np.ndarray, terms: dict[str, np.ndarray], evals: list, lrs: np.ndarray,
             p: str) -> int:
        """Smooth a chunk (steps start.., all run by this column's model), cut it at the first
        step that trips the stop rule, keep it and report it; returns how many steps were kept."""
        smoothed = self.smoother.update(raw)
        bad = self.rule.first_stop(raw, smoothed, start)
        keep = len(raw) if bad is None else bad + 1
        if bad is not None:
            self.stop_reason = self.rule.reason
        self.losses.append(raw[:keep])
        self.smoothed.append(smoothed[:keep])
        terms = {name: values[:keep] for name, values in terms.items()}
        for name, values in terms.items():
            self.terms[name].append(values)
        evals = [e for e in evals if e[0] < start + keep]
        self.evals += evals
        self.length += keep
        self.sink.series(np.arange(start, start + keep),
                         {p + "lr": lrs[start:start + keep], p + "loss": raw[:keep],
                          p + "smoothed_loss": smoothed[:keep]} | {f"{p}loss/{k}": v for k, v in terms.items()})
        if evals:
            e = np.array(evals)
            values = {p + "accuracy": e[:, 1]}
            if np.isfinite(e[:, 2]).any():  # a user's metric_fn gives no loss
                values[p + "val_loss"] = e[:, 2]
            self.sink.points(e[:, 0].astype(int), values)
        return keep

    def result(self, lrs: np.ndarray, **fields) -> RangeTestResult:
        losses = np.concatenate(self.losses) if self.losses else np.empty(0)
        e = np.array(self.evals).reshape(-1, 3)
        return RangeTestResult(
            lrs=np.asarray(lrs[: len(losses)], dtype=np.float64), losses=losses,
            smoothed=np.concatenate(self.smoothed) if self.smoothed else np.empty(0),
            eval_steps=e[:, 0].astype(int), accuracies=e[:, 1], val_losses=e[:, 2], planned_iters=len(lrs),
            stop_reason=self.stop_reason or "reached lr_end without diverging",
            terms={k: np.concatenate(v) for k, v in self.terms.items()}, **fields)


class _Curve:
    """The curves as the loop makes them, one column per model stepped: each step's losses
    wait on the device (one row per step); `flush` brings the pending chunk to the host and
    hands each column still running its part. The loop runs while any column runs."""

    def __init__(self, lrs: np.ndarray, sync_every: int, device: torch.device, beta: float, diverge: float,
                 sinks: Sequence[Sink], prefix: str):
        self.lrs, self.prefix, self.device = lrs, prefix, device
        self.columns = [_Column(beta, diverge, sink) for sink in sinks]
        self.buf = torch.empty(sync_every, len(self.columns), device=device)
        self.term_bufs: dict[str, torch.Tensor] = {}
        self.pending_evals: list[tuple[int, float, float]] = []
        self.start, self.n = 0, 0     # the pending chunk: steps start .. start + n - 1

    @property
    def next_step(self) -> int:
        return self.start + self.n

    @property
    def running(self) -> bool:
        return any(c.stop_reason is None for c in self.columns)

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """One step's loss: a scalar (one model) or one value per column (broadcast to the row)."""
        self.buf[self.n] = loss
        for name, value in terms.items():
            if name not in self.term_bufs:
                self.term_bufs[name] = torch.full(self.buf.shape, float("nan"), device=self.device)
                for c in self.columns:  # NaN for the steps each column kept before the term appeared
                    c.terms[name] = [np.full(c.length, np.nan)]
            self.term_bufs[name][self.n] = value
        self.n += 1

    def add_eval(self, step: int, values: dict[str, float]) -> None:
        self.pending_evals.append((step, values["accuracy"], values.get("val_loss", np.nan)))

    def flush(self) -> int:
        """Report the pending chunk; returns the most steps a column kept of it."""
        start, n = self.start, self.n
        # One copy per chunk, as float64 columns (a copy even where the buffer is float64
        # already: the next chunk overwrites the buffer, not what was kept).
        raw = self.buf[:n].to("cpu", torch.float64, copy=True).numpy().T.copy()
        terms = {name: tb[:n].to("cpu", torch.float64, copy=True).numpy().T.copy()
                 for name, tb in self.term_bufs.items()}
        for tb in self.term_bufs.values():
            tb.fill_(float("nan"))
        evals, self.pending_evals = self.pending_evals, []
        self.start, self.n = start + n, 0
        kept = [c.take(start, raw[i], {k: v[i] for k, v in terms.items()}, evals, self.lrs, self.prefix)
                for i, c in enumerate(self.columns) if c.stop_reason is None]
        return max(kept, default=0)

    def results(self, **fields) -> list[RangeTestResult]:
        return [c.result(self.lrs, **fields) for c in self.columns]


def range_test(stepper: Stepper, loader: Iterable, lrs: np.ndarray, *, accumulate: int = 1, beta: float = 0.98,
               diverge: float = 4.0, val_loader: Iterable | None = None, evaluator: Evaluator | None = None,
               eval_every: int = 0, sink: Sink = NullSink(), prefix: str = "range_test/",
               sync_every: int = SYNC_EVERY, sweep: str = "exp", progress: bool = True) -> RangeTestResult:
    """One optimizer step (of `accumulate` batches) per lr in `lrs`. Param group g runs at
    lrs[i] * lr_g / lr_0, so discriminative lrs keep their ratios. Model, optimizer, data
    order and RNGs are restored afterwards, also when the loop raises; what it measured
    before an error or Ctrl-C still reaches the sink."""
    return range_tests(stepper, loader, lrs, accumulate=accumulate, beta=beta, diverge=diverge,
                       val_loader=val_loader, evaluator=evaluator, eval_every=eval_every, sinks=[sink],
                       prefix=prefix, sync_every=sync_every, sweep=sweep, progress=progress)[0]


def range_tests(stepper: Stepper, loader: Iterable, lrs: np.ndarray, *, accumulate: int = 1, beta: float = 0.98,
                diverge: float = 4.0, val_loader: Iterable | None = None, evaluator: Evaluator | None = None,
                eval_every: int = 0, sinks: Sequence[Sink] = (NullSink(),), prefix: str = "range_test/",
                sync_every: int = SYNC_EVERY, sweep: str = "exp", progress: bool = True) -> list[RangeTestResult]:
    """The loop (`range_test` is this with one sink), one curve per sink. With a `Stepper`,
    one model and one sink. With a `batched.BatchedStepper` of K seeds, K sinks: `loader`
    yields a tuple of K batches and each step gives K losses; each curve stops at its own
    divergence and the loop when all have stopped (a stopped seed still steps, unrecorded,
    as steps after a stop within a chunk do)."""
    if len(sinks) > 1 and val_loader is not None:
        raise ValueError("Expected no val_loader with several curves in one loop: held-out evaluation "
                         "runs one model (run the seeds one after another)")
    model, optimizer = stepper.model, stepper.optimizer
    snapshot = Snapshot(model, optimizer, loader, *([val_loader] if val_loader is not None else []),
                        scaler=stepper.scaler)
    ratios = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    curve = _Curve(lrs, sync_every, stepper.device, beta, diverge, sinks, prefix)
    skipped = 0
    if not model.training:  # a model handed over in eval mode trains; submodules the user froze stay frozen
        model.train()
    try:
        stream = cycle(loader)
        with tqdm(total=len(lrs), desc="range test", unit="it", leave=False, disable=not progress) as bar:
            while curve.next_step < len(lrs) and curve.running:
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
    return curve.results(skipped_steps=skipped, sweep=sweep)
