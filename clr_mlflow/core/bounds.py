"""Bound-suggestion rules: one range-test curve in, one (base_lr, max_lr) row per rule out.

Each rule is a pure function of arrays. A curve a rule cannot read (too short, flat,
all NaN, no accuracy measured) gives a row whose `note` says why, never an exception.
"""
from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

MIN_POINTS = 10       # fewer finite losses than this cannot show a descent
FLAT_TOL = 0.01       # a curve whose smoothed loss never falls by 1% of its own range is flat
MIN_ACC_RISE = 0.02   # accuracy must rise by 2 points before the accuracy rule answers
RISE_FRAC = 0.10      # "starts to rise" / "turns ragged" = 10% of the total rise
SKIP_START = 10       # the steepest rule ignores the first points, where the EMA settles
SLIDE_DIFF = 15       # fastai's slide window (lr_diff), in points
# fastai's slide threshold .005 is loss per point of its default sweep (100 points over
# 1e-7..10: 0.08 decade each), i.e. .0625 loss per decade. We compare slopes per decade and
# take .0625 per unit of loss drop: relative to the drop (not the loss itself) it is blind to
# the loss's units and to a constant added to it, as the slopes are.
SLIDE_THRESH = 0.0625
# The selected max_lr more than this many times valley's (fastai's default, the lowest rule on
# all but one family's curve in docs/RESULTS.md): the rules disagree about where the useful
# range ends.
DISAGREE = 30.0
DISAGREE_MARK = "disagrees with valley:"  # how the table's note of it begins

LOWER_LIMIT = ("minimum at the last lr: the test did not diverge, so max_lr is a lower limit;"
               " raise lr_end or num_iters")
NO_BLOWUP = ("minimum at the last lr: the test did not diverge, so slide started on a falling"
             " curve, not at the blow-up; raise lr_end or num_iters")


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
    # Measured against the curve's own range (not the loss's value), so a loss that is
    # negative or carries a constant is read like any other; a loss that never changes
    # (range 0, e.g. a default loss on targets it cannot read) is flat, never a suggestion.
    low = int(np.argmin(smoothed))
    fell = smoothed[: low + 1].max() - smoothed[low]
    spread = smoothed.max() - smoothed.min()
    rounding = 16 * np.finfo(np.float64).eps * np.abs(smoothed).max()
    if spread <= rounding or fell <= FLAT_TOL * spread:
        return f"flat: smoothed loss never fell by {FLAT_TOL:.0%} of its range below an earlier value"
    return None


def _loss_rule(rule: str, lrs, smoothed, divisor: float, pick, undiverged: str = LOWER_LIMIT) -> Suggestion:
    """The frame every loss rule shares: read the finite prefix, refuse an unreadable curve
    with a note, let `pick(lrs, smoothed) -> (max_lr, note)` answer (NaN max_lr: its note
    says why not), then state the base_lr rule and whether the test ever diverged."""
    n_all = len(np.atleast_1d(smoothed))
    lrs, smoothed = _finite_prefix(lrs, smoothed)
    if problem := _loss_problem(lrs, smoothed):
        return Suggestion(rule, note=problem)
    max_lr, why = pick(lrs, smoothed)
    max_lr = float(max_lr)
    if not np.isfinite(max_lr):
        return Suggestion(rule, note=why)
    notes = [f"base_lr = max_lr/{divisor:g}", why]
    # A minimum at the very last point (and no non-finite loss after it) means the loss never
    # turned up: the edge lies beyond lr_end, and a bare number would hide that.
    if len(smoothed) == n_all and int(np.argmin(smoothed)) == n_all - 1:
        notes.append(undiverged)
    return Suggestion(rule, max_lr / divisor, max_lr, "; ".join(n for n in notes if n))


def loss_edge(lrs, smoothed, divisor: float = 4.0) -> Suggestion:
    """max_lr = the lr at the minimum of the smoothed loss (the edge of stable descent:
    past it the loss rises); base_lr = max_lr / divisor (the paper's max/3 ... max/4)."""
    return _loss_rule("loss_edge", lrs, smoothed, divisor, lambda x, s: (x[np.argmin(s)], ""))


def _steepest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, str]:
    end = int(np.argmin(smoothed))
    k = max(1, len(smoothed) // 50)
    first = min(SKIP_START, end // 2)
    centres = np.arange(max(first, k), end - k + 1)
    if len(centres) == 0:
        return float("nan"), "the minimum is at the very start of the curve"
    x = np.log10(lrs)
    slope = (smoothed[centres + k] - smoothed[centres - k]) / (x[centres + k] - x[centres - k])
    return lrs[centres[np.argmin(slope)]], ""


def steepest(lrs, smoothed, divisor: float = 4.0) -> Suggestion:
    """fastai's steepest descent: max_lr = the lr where the slope of the smoothed loss vs
    log10(lr) is most negative, looking only between the first SKIP_START points (where
    the EMA still settles) and the minimum. The slope at i is a central difference over
    +-k points, k = n/50 (at least 1), so single noisy steps do not win; base_lr =
    max_lr / divisor."""
    return _loss_rule("steepest", lrs, smoothed, divisor, _steepest)


def min_div10(lrs, smoothed, divisor: float = 4.0) -> Suggestion:
    """fastai's 'minimum / 10': max_lr = (lr at the smoothed-loss minimum) / 10, which
    backs off the EMA's lag; base_lr = max_lr / divisor."""
    return _loss_rule("min_div10", lrs, smoothed, divisor, lambda x, s: (x[np.argmin(s)] / 10.0, ""))


def _valley(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, str]:
    # lds[i]: length of the longest strictly falling subsequence (not necessarily contiguous)
    # ending at i. fastai's double loop is O(n^2); patience sorting on -loss gives the same
    # numbers in O(n log n): tails[k] is the smallest last -loss of a rising run of k+1.
    tails: list[float] = []
    lds = np.empty(len(smoothed), dtype=np.int64)
    for i, v in enumerate(-smoothed):
        pos = bisect.bisect_left(tails, v)
        tails[pos:pos + 1] = [v]
        lds[i] = pos + 1
    end = int(np.argmax(lds))  # fastai keeps the first index that reaches the longest run
    start = end - int(lds[end])  # fastai's start: one before the run's first possible point
    third = (end - start) / 3
    # fastai's idx; it is -1 (Python: the LAST lr) for a 2-point run from the first point,
    # an indexing accident, so it is clamped to the first point.
    return lrs[max(0, start + int(third) + int(third / 2))], ""


def valley(lrs, smoothed, divisor: float = 4.0) -> Suggestion:
    """fastai's valley rule (its default): find the longest strictly falling subsequence of
    the smoothed loss, ending at index `end` with length L (the first such end), set start =
    end - L and third = L / 3, and take max_lr = lr[start + int(third) + int(third / 2)],
    about half-way along the valley. base_lr = max_lr / divisor."""
    return _loss_rule("valley", lrs, smoothed, divisor, _valley)


def _slide(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, str]:
    n = len(smoothed)
    if n <= SLIDE_DIFF:
        return float("nan"), f"too short for slide: {n} finite points, need more than {SLIDE_DIFF}"
    low = int(np.argmin(smoothed))
    tol = SLIDE_THRESH * (smoothed[: low + 1].max() - smoothed[low])
    slope = np.gradient(smoothed, np.log10(lrs))
    right = np.arange(n - 1, SLIDE_DIFF - 1, -1)  # window k: points right-SLIDE_DIFF .. right
    left = right - SLIDE_DIFF
    calm = np.abs(slope[right] - slope[left]) <= tol
    k = int(np.argmax(calm)) if calm.any() else len(right)
    idx = left[max(k - 1, 0)]  # the last window that still differed (the first, if none did)
    notes = ["no window was calm: slid to the first lr"] if k == len(right) else []
    if idx > low:
        notes.append("max_lr is past the loss minimum")
    return lrs[idx], "; ".join(notes)


def slide(lrs, smoothed, divisor: float = 4.0) -> Suggestion:
    """fastai's slide rule, with two changes. slope = np.gradient of the smoothed loss
    against log10(lr) (fastai: against the point index, so its threshold depends on the
    sweep's density). A window of SLIDE_DIFF = 15 points (fastai's lr_diff) starts at the end
    of the curve (the blow-up) and moves one point left while |slope(right end) - slope(left
    end)| > SLIDE_THRESH (0.0625) x drop, drop = the highest smoothed loss before the minimum minus
    the minimum (fastai: > .005, absolute). max_lr = the left lr of the last window that
    still differed (of the first window if it was already calm; the first lr if no window
    was calm); fastai's adjust_value = 1 multiplies by nothing. base_lr = max_lr / divisor."""
    return _loss_rule("slide", lrs, smoothed, divisor, _slide, undiverged=NO_BLOWUP)


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
    return Suggestion("accuracy", float(lrs[start]), float(lrs[best]),
                      f"base_lr = where accuracy starts rising ({RISE_FRAC:.0%} of its rise)")


RULES = ("min_div10", "steepest", "loss_edge", "accuracy", "valley", "slide")


def suggest_bounds(lrs, smoothed, eval_lrs=(), accuracies=(), divisor: float = 4.0) -> list[Suggestion]:
    return [
        min_div10(lrs, smoothed, divisor),
        steepest(lrs, smoothed, divisor),
        loss_edge(lrs, smoothed, divisor),
        accuracy(eval_lrs, accuracies),
        valley(lrs, smoothed, divisor),
        slide(lrs, smoothed, divisor),
    ]


def bounds_frame(suggestions: list[Suggestion], selected: str) -> pd.DataFrame:
    """The best-bounds table: columns rule, base_lr, max_lr, selected, note (the selected
    row's note says when its max_lr is more than DISAGREE x valley's: `disagreement`)."""
    return mark_disagreement(pd.DataFrame(
        {
            "rule": [s.rule for s in suggestions],
            "base_lr": [s.base_lr for s in suggestions],
            "max_lr": [s.max_lr for s in suggestions],
            "selected": [s.rule == selected for s in suggestions],
            "note": [s.note for s in suggestions],
        }
    ))


def disagreement(table: pd.DataFrame) -> str | None:
    """When the selected row's max_lr is more than DISAGREE (30) x the valley row's, a line
    saying so (the two disagree about where the useful range ends: training decides, see
    tune_bounds); None when they agree, either has no bounds, or valley is selected."""
    chosen, valley_row = table[table["selected"].astype(bool)], table[table["rule"] == "valley"]
    if chosen.empty or valley_row.empty:
        return None
    top, low = float(chosen["max_lr"].iloc[0]), float(valley_row["max_lr"].iloc[0])
    if not (np.isfinite(top) and np.isfinite(low) and low > 0 and top > DISAGREE * low):
        return None
    return (f"{DISAGREE_MARK} {chosen['rule'].iloc[0]} max_lr {top:.3g} is {top / low:.0f}x valley's {low:.3g}, "
            f"more than {DISAGREE:g}x: they disagree about where the useful range ends, so train both briefly "
            "and keep the better (clr_mlflow.tune_bounds, CLI bounds_rule=tuned)")


def mark_disagreement(table: pd.DataFrame) -> pd.DataFrame:
    """The table with `disagreement`'s line appended to the selected row's note (a line
    already there, e.g. seed 0's in a table over seeds, is replaced)."""
    def parts(note) -> list[str]:
        return [p for p in str(note).split("; ") if p and not p.startswith(DISAGREE_MARK)]

    table = table.copy()
    table["note"] = ["; ".join(parts(n)) for n in table["note"]]
    if line := disagreement(table):
        at = table.index[table["selected"].astype(bool)][0]
        table.loc[at, "note"] = "; ".join(parts(table.loc[at, "note"]) + [line])
    return table


def spread_frame(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """The bounds table over several seeds' tables (same rules, same order): per rule,
    base_lr and max_lr are the medians over the seeds where the rule answered,
    max_lr_min/max_lr_max their range and `seeds` how many answered. The note is the
    first seed's, with how many seeds gave no bounds when some did not."""
    first = tables[0]
    base = np.array([t["base_lr"].to_numpy(dtype=float) for t in tables])
    top = np.array([t["max_lr"].to_numpy(dtype=float) for t in tables])
    ok = np.isfinite(base) & np.isfinite(top)
    answered = ok.sum(axis=0)
    masked = np.where(ok, top, np.nan)
    with warnings.catch_warnings():  # a rule no seed answered: an all-NaN column, NaN in the table
        warnings.simplefilter("ignore", RuntimeWarning)
        table = pd.DataFrame({
            "rule": first["rule"],
            "base_lr": np.nanmedian(np.where(ok, base, np.nan), axis=0),
            "max_lr": np.nanmedian(masked, axis=0),
            "max_lr_min": np.nanmin(masked, axis=0),
            "max_lr_max": np.nanmax(masked, axis=0),
            "seeds": answered,
            "selected": first["selected"],
            "note": first["note"],
        })
    partly = (answered > 0) & (answered < len(tables))
    table.loc[partly, "note"] = [f"{n}; {len(tables) - a} of {len(tables)} seeds gave no bounds".lstrip("; ")
                                 for n, a in zip(table.loc[partly, "note"], answered[partly])]
    return mark_disagreement(table)  # of the medians, not seed 0's
