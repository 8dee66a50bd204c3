"""Bound-suggestion rules: one range-test curve in, one (base_lr, max_lr) row per rule out.

Each rule is a pure function of arrays. A curve a rule cannot read (too short, flat,
all NaN, no accuracy measured) gives a row whose `note` says why, never an exception.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MIN_POINTS = 10       # fewer finite losses than this cannot show a descent
FLAT_TOL = 0.01       # a curve whose smoothed loss never falls 1% below an earlier value is flat
MIN_ACC_RISE = 0.02   # accuracy must rise by 2 points before the accuracy rule answers
RISE_FRAC = 0.10      # "starts to rise" / "turns ragged" = 10% of the total rise
SKIP_START = 10       # the steepest rule ignores the first points, where the EMA settles


@dataclass(frozen=True)
class Suggestion:
    rule: str
    base_lr: float = float("nan")
    max_lr: float = float("nan")
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.base_lr) and np.isfinite(self.max_lr))


def _finite_prefix(lrs, smoothed) -> tuple[np.ndarray, np.ndarray]:
    lrs = np.asarray(lrs, dtype=np.float64)
    smoothed = np.asarray(smoothed, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(smoothed))
    end = bad[0] if len(bad) else len(smoothed)
    return lrs[:end], smoothed[:end]


def _loss_problem(lrs: np.ndarray, smoothed: np.ndarray) -> str | None:
    if len(smoothed) == 0:
        return "no finite loss values"
    if len(smoothed) < MIN_POINTS:
        return f"too short: {len(smoothed)} finite points, need at least {MIN_POINTS}"
    low = int(np.argmin(smoothed))
    if smoothed[low] > smoothed[: low + 1].max() * (1 - FLAT_TOL):
        return f"flat: smoothed loss never fell {FLAT_TOL:.0%} below an earlier value"
    return None


def loss_edge(lrs, smoothed, divisor: float = 4.0) -> Suggestion:
    """max_lr = the lr at the minimum of the smoothed loss (the edge of stable descent:
    past it the loss rises); base_lr = max_lr / divisor (the paper's max/3 ... max/4)."""
    lrs, smoothed = _finite_prefix(lrs, smoothed)
    if problem := _loss_problem(lrs, smoothed):
        return Suggestion("loss_edge", note=problem)
    max_lr = float(lrs[np.argmin(smoothed)])
    return Suggestion("loss_edge", max_lr / divisor, max_lr)


def steepest(lrs, smoothed, divisor: float = 4.0) -> Suggestion:
    """fastai's steepest descent: max_lr = the lr where the slope of the smoothed loss vs
    log10(lr) is most negative, looking only between the first SKIP_START points (where
    the EMA still settles) and the minimum. The slope at i is a central difference over
    +-k points, k = n/50 (at least 1), so single noisy steps do not win; base_lr =
    max_lr / divisor."""
    lrs, smoothed = _finite_prefix(lrs, smoothed)
    if problem := _loss_problem(lrs, smoothed):
        return Suggestion("steepest", note=problem)
    end = int(np.argmin(smoothed))
    k = max(1, len(smoothed) // 50)
    first = min(SKIP_START, end // 2)
    centres = np.arange(max(first, k), end - k + 1)
    if len(centres) == 0:
        return Suggestion("steepest", note="the minimum is at the very start of the curve")
    x = np.log10(lrs)
    slope = (smoothed[centres + k] - smoothed[centres - k]) / (x[centres + k] - x[centres - k])
    max_lr = float(lrs[centres[np.argmin(slope)]])
    return Suggestion("steepest", max_lr / divisor, max_lr)


def min_div10(lrs, smoothed, divisor: float = 4.0) -> Suggestion:
    """fastai's 'minimum / 10': max_lr = (lr at the smoothed-loss minimum) / 10, which
    backs off the EMA's lag; base_lr = max_lr / divisor."""
    lrs, smoothed = _finite_prefix(lrs, smoothed)
    if problem := _loss_problem(lrs, smoothed):
        return Suggestion("min_div10", note=problem)
    max_lr = float(lrs[np.argmin(smoothed)]) / 10.0
    return Suggestion("min_div10", max_lr / divisor, max_lr)


def accuracy(eval_lrs, accuracies) -> Suggestion:
    """The paper's rule, on held-out accuracy measured during the sweep. With rise =
    max(acc) - acc[0]: base_lr = the first lr where accuracy is `RISE_FRAC` x rise above its
    start; max_lr = the lr of the running maximum just before accuracy first drops more
    than `RISE_FRAC` x rise below it (turns ragged), or of the maximum if it never does."""
    lrs = np.asarray(eval_lrs, dtype=np.float64)
    acc = np.asarray(accuracies, dtype=np.float64)
    if len(acc) == 0:
        return Suggestion("accuracy", note="accuracy was not measured (eval_every=0)")
    keep = np.isfinite(acc)
    lrs, acc = lrs[keep], acc[keep]
    if len(acc) < 3:
        return Suggestion("accuracy", note=f"too short: {len(acc)} accuracy points, need 3")
    rise = acc.max() - acc[0]
    if rise < MIN_ACC_RISE:
        return Suggestion("accuracy", note=f"accuracy never rose {MIN_ACC_RISE:.0%} above its start")
    margin = RISE_FRAC * rise
    start = int(np.argmax(acc >= acc[0] + margin))
    best = start
    for i in range(start, len(acc)):
        if acc[i] >= acc[best]:
            best = i
        elif acc[i] < acc[best] - margin:
            break
    if best <= start:
        return Suggestion("accuracy", note="accuracy peaked where it started to rise")
    return Suggestion("accuracy", float(lrs[start]), float(lrs[best]))


RULES = ("min_div10", "steepest", "loss_edge", "accuracy")


def suggest_bounds(lrs, smoothed, eval_lrs=(), accuracies=(), divisor: float = 4.0) -> list[Suggestion]:
    return [
        min_div10(lrs, smoothed, divisor),
        steepest(lrs, smoothed, divisor),
        loss_edge(lrs, smoothed, divisor),
        accuracy(eval_lrs, accuracies),
    ]


def bounds_frame(suggestions: list[Suggestion], selected: str) -> pd.DataFrame:
    """The best-bounds table: columns rule, base_lr, max_lr, selected, note."""
    return pd.DataFrame(
        {
            "rule": [s.rule for s in suggestions],
            "base_lr": [s.base_lr for s in suggestions],
            "max_lr": [s.max_lr for s in suggestions],
            "selected": [s.rule == selected for s in suggestions],
            "note": [s.note for s in suggestions],
        }
    )
