"""Figures from data: nothing here computes a suggestion or talks to MLflow.

A guest in the user's process: no backend is chosen and no rcParams change. Figures are
`matplotlib.figure.Figure` objects made without pyplot (so they are not in pyplot's list of
open figures, need no GUI backend, and are freed like any object); our seaborn look is
applied inside `_styled`'s rc_context, only while a figure is built.
"""
from __future__ import annotations

import functools

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _style() -> dict:
    import seaborn as sns  # seaborn costs ~0.5 s to import: only when a figure is drawn

    return {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook")}


def _styled(make):
    """Build the figure inside an rc_context with our style: the process's rcParams are
    untouched afterwards (a user's own plots look as they did)."""
    @functools.wraps(make)
    def build(*args, **kwargs):
        with matplotlib.rc_context(_style()):
            return make(*args, **kwargs)
    return build


def _subplots(*grid, figsize) -> tuple:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def _palette(name: str, n: int) -> list:
    import seaborn as sns

    return sns.color_palette(name, n)


def _finish(fig: Figure, ax: Axes, xlabel: str, ylabel: str, title: str, legend: bool) -> Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


LOSS_COLOR, ACCURACY_COLOR = "tab:blue", "tab:green"  # the data lines of the range-test plot
# Each bounds rule's marker: a colour and a dash pattern that no data line uses, so a rule's
# vertical line is never mistaken for the loss or the accuracy curve.
RULE_STYLES = {
    "min_div10": ("tab:red", (0, (6, 2))),
    "steepest": ("tab:purple", (0, (1, 1.5))),
    "loss_edge": ("black", (0, (8, 2, 1, 2))),
    "accuracy": ("tab:brown", (0, (3, 1, 1, 1, 1, 1))),
    "valley": ("tab:olive", (0, (2, 2))),
    "slide": ("magenta", (0, (5, 1, 1, 1))),
}
# Any other rule takes the next unused (colour, dash) pair from these.
SPARE_COLORS = ("tab:orange", "tab:gray", "indigo", "darkgoldenrod", "tab:cyan", "tab:pink")
SPARE_DASHES = ((0, (2, 2)), (0, (5, 1, 1, 1)), (0, (10, 3)), (0, (1, 3)), (0, (4, 2, 4, 2, 1, 2)))
OWN_BASE_LR = ("accuracy",)  # rules whose base_lr is read off the curve, not max_lr / bounds_divisor


def rule_styles(rules) -> dict[str, tuple[str, tuple]]:
    """(colour, dash pattern) per rule name: the fixed ones above for the known rules, then
    distinct unused (colour, dash) pairs for any others, in the order given. No two rules
    share a pair and no rule uses a data line's colour."""
    out = {r: RULE_STYLES[r] for r in rules if r in RULE_STYLES}
    used = set(out.values())
    spare = ((c, d) for d in SPARE_DASHES for c in SPARE_COLORS)
    for rule in rules:
        if rule not in out:
            pair = next(p for p in spare if p not in used)
            out[rule] = pair
            used.add(pair)
    return out


def _loss_ylim(curve: pd.DataFrame, lrs_marked: list[float]) -> tuple[tuple[float, float] | None, float | None]:
    """y limits for the range-test plot, and the lr from which loss leaves the view.
    The view holds the smoothed curve and every raw loss up to the largest marked lr (at
    least up to the smoothed minimum), with a 5% margin: the noise where the bounds sit
    stays visible, and only the diverging tail beyond the marks can be cut off."""
    lr = curve["lr"].to_numpy(float)
    smoothed = curve["smoothed_loss"].to_numpy(float)
    raw = curve["loss"].to_numpy(float)
    ok = np.isfinite(smoothed)
    if not ok.any():
        return None, None
    edge = max([v for v in lrs_marked if np.isfinite(v)] + [lr[ok][np.argmin(smoothed[ok])]])
    region = lr <= edge
    values = np.concatenate([smoothed[ok & region], raw[np.isfinite(raw) & region]])
    lo, hi = values.min(), values.max()
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
    lo, hi = lo - pad, hi + pad
    outside = (np.isfinite(raw) & ((raw > hi) | (raw < lo))) | (ok & ((smoothed > hi) | (smoothed < lo)))
    return (lo, hi), (float(lr[outside].min()) if outside.any() else None)


@_styled
def range_test_figure(curve: pd.DataFrame, bounds: pd.DataFrame, log_x: bool = True,
                      own_base_lr: tuple[str, ...] = OWN_BASE_LR, band: pd.DataFrame | None = None,
                      seeds: int = 1, ax: Axes | None = None) -> Figure:
    """Smoothed loss vs lr (raw loss faint), each rule's max_lr marked in its own colour and
    dash pattern (rule_styles), the base_lr of rules in `own_base_lr` marked too, the chosen
    bounds shaded, held-out accuracy on a twin axis when it was measured. The y axis holds
    the smoothed and the raw loss up to the marked lrs (_loss_ylim); the title says from
    which lr on loss leaves the view (the diverging tail). With `band` (lr, median, low, high
    over `seeds` range tests) the median smoothed loss is drawn with its min-max band, and
    each rule's max_lr spread over the seeds (max_lr_min..max_lr_max) is shaded. `ax`: draw
    into this Axes (a subplot of the caller's figure) and return its figure."""
    own_figure = ax is None
    fig, ax = _subplots(figsize=(9, 6.5)) if own_figure else (ax.figure, ax)
    ax.plot(curve["lr"], curve["loss"], color=LOSS_COLOR, alpha=0.3, lw=1, label="loss")
    if band is not None:
        ax.fill_between(band["lr"], band["low"], band["high"], color=LOSS_COLOR, alpha=0.25,
                        label=f"smoothed loss, min-max over {seeds} seeds")
        ax.plot(band["lr"], band["median"], color=LOSS_COLOR, lw=2, label=f"median smoothed loss ({seeds} seeds)")
    else:
        ax.plot(curve["lr"], curve["smoothed_loss"], color=LOSS_COLOR, lw=2, label="smoothed loss")
    if log_x:
        ax.set_xscale("log")
    styles = rule_styles(list(bounds["rule"]) if len(bounds) else [])
    marked = []
    for row in bounds.itertuples():
        color, dash = styles[row.rule]
        max_ok, base_ok = np.isfinite(row.max_lr), np.isfinite(row.base_lr)
        if max_ok:
            ax.axvline(row.max_lr, color=color, ls=dash, lw=1.6, label=f"{row.rule}: max_lr {row.max_lr:.3g}")
            marked.append(row.max_lr)
            low, high = getattr(row, "max_lr_min", np.nan), getattr(row, "max_lr_max", np.nan)
            if band is not None and np.isfinite(low) and np.isfinite(high) and high > low:
                ax.axvspan(low, high, ymin=0, ymax=0.06, color=color, alpha=0.5)  # the rule's spread over seeds
        if base_ok and row.rule in own_base_lr:
            ax.axvline(row.base_lr, color=color, ls=dash, lw=1.0, alpha=0.8,
                       label=f"{row.rule}: base_lr {row.base_lr:.3g}")
            marked.append(row.base_lr)
        if row.selected and base_ok and max_ok:
            ax.axvspan(row.base_lr, row.max_lr, color=color, alpha=0.12,
                       label=f"chosen ({row.rule}): {row.base_lr:.3g} - {row.max_lr:.3g}")
    ylim, cut_from = _loss_ylim(curve, marked)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    handles, labels = ax.get_legend_handles_labels()
    acc = curve.dropna(subset=["accuracy"]) if "accuracy" in curve else curve.iloc[:0]
    if len(acc):
        ax2 = ax.twinx()
        ax2.plot(acc["lr"], acc["accuracy"], "o-", color=ACCURACY_COLOR, ms=3, lw=1.2, label="held-out accuracy")
        ax2.set_ylabel("held-out accuracy")
        ax2.grid(False)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    # below the axes, where it hides no part of the curve
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False)
    ax.set_title("LR range test" + (f" (loss leaves the view from lr {cut_from:.3g} on)" if cut_from is not None
                                    else ""))
    if own_figure:  # a caller's figure keeps the layout the caller gave it
        fig.tight_layout()
    return fig


def _training_title(what: str, policy: str | None, bounds: tuple[float, float] | None) -> str:
    parts = [p for p in (policy, f"lr {bounds[0]:.3g} - {bounds[1]:.3g}" if bounds else None) if p]
    return what + (f": {', '.join(parts)}" if parts else "")


@_styled
def schedule_figure(lrs: np.ndarray, cycle_len: int | None, policy: str | None = None,
                    bounds: tuple[float, float] | None = None) -> Figure:
    """lr per iteration, with cycle boundaries marked; the title names the policy and the
    (base_lr, max_lr) bounds when given."""
    fig, ax = _subplots(figsize=(9, 4))
    ax.plot(np.arange(len(lrs)), lrs, lw=1.5)
    if cycle_len:
        for b in range(cycle_len, len(lrs), cycle_len):
            ax.axvline(b, color="grey", ls=":", lw=1)
    return _finish(fig, ax, "iteration", "learning rate", _training_title("Learning-rate schedule", policy, bounds),
                   legend=False)


@_styled
def training_figure(epochs: pd.DataFrame, lrs: np.ndarray, policy: str | None = None,
                    bounds: tuple[float, float] | None = None) -> Figure:
    """Train/val loss and accuracy per epoch (x = iteration), lr on a twin axis; the title
    names the policy and the (base_lr, max_lr) bounds when given."""
    fig, (ax_loss, ax_acc) = _subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs["step"], epochs[f"train_{metric}"], "o-", ms=3, label=f"train {metric}")
        ax.plot(epochs["step"], epochs[f"val_{metric}"], "o-", ms=3, label=f"val {metric}")
        ax.set_xlabel("iteration")
        ax.set_ylabel(metric)
        twin = ax.twinx()
        twin.plot(np.arange(len(lrs)), lrs, color="grey", alpha=0.35, lw=1, label="lr")
        twin.set_ylabel("learning rate")
        twin.grid(False)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    fig.suptitle(_training_title("Training", policy, bounds))
    fig.tight_layout()
    return fig


def _policy_palette(policies) -> dict:
    names = sorted({str(p) for p in policies})
    return dict(zip(names, _palette("deep", len(names))))


def run_label(run_id: str, names: dict[str, str] | None) -> str:
    """A run's name (from `names`: run id -> run name), or the first 8 characters of its id."""
    name = (names or {}).get(run_id)
    return name if isinstance(name, str) and name else run_id[:8]


@_styled
def _runs_overlay(series: pd.DataFrame, ylabel: str, title: str, names: dict[str, str] | None, step_offset: int = 0,
                  **style) -> Figure:
    """One line per run, coloured by policy, labelled by run name. `series`: columns run,
    policy, step, value."""
    fig, ax = _subplots(figsize=(9, 5))
    colors = _policy_palette(series["policy"])
    for (run, policy), g in series.groupby(["run", "policy"], sort=False):
        ax.plot(g["step"] + step_offset, g["value"], color=colors[str(policy)],
                label=f"{run_label(run, names)} ({policy})", **style)
    return _finish(fig, ax, "iteration", ylabel, title, legend=len(series) > 0)


def compare_accuracy_figure(series: pd.DataFrame, names: dict[str, str] | None = None) -> Figure:
    """Validation accuracy (val/accuracy) vs iterations run (step + 1), one line per run,
    coloured by policy."""
    return _runs_overlay(series, "validation accuracy", "Validation accuracy per run", names, step_offset=1,
                         marker="o", ms=2.5, lw=1.3)


def compare_lr_figure(series: pd.DataFrame, names: dict[str, str] | None = None) -> Figure:
    """The runs' lr schedules overlaid."""
    return _runs_overlay(series, "learning rate", "Learning-rate schedules", names, lw=1.2, alpha=0.85)


BAND_ALPHA = 0.25  # the chosen-bounds bands of compare/range_tests.png


@_styled
def compare_range_tests_figure(curves: dict[str, pd.DataFrame], chosen: pd.DataFrame,
                               names: dict[str, str] | None = None) -> Figure:
    """Range-test curves (smoothed loss vs lr) overlaid, labelled by run name (`names`: run
    id -> name), each run's chosen bounds shaded in its colour. `curves`: run id -> its
    curve.csv (one line per seed when it has a seed column); `chosen`: columns run_id,
    base_lr, max_lr."""
    fig, ax = _subplots(figsize=(9, 5))
    palette = _palette("husl", max(1, len(curves)))
    for color, (run, curve) in zip(palette, curves.items()):
        seeds = [g for _, g in curve.groupby("seed", sort=False)] if "seed" in curve else [curve]
        label = run_label(run, names) + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
        for i, one in enumerate(seeds):  # a multi-seed test: one line per seed, in the run's colour
            ax.plot(one["lr"], one["smoothed_loss"], lw=1.5 if len(seeds) == 1 else 1.0, color=color,
                    label=label if i == 0 else None)
        row = chosen[chosen["run_id"] == run]
        if len(row) and np.isfinite(row["max_lr"].iloc[0]):
            ax.axvspan(row["base_lr"].iloc[0], row["max_lr"].iloc[0], color=color, alpha=BAND_ALPHA, lw=0)
    ax.set_xscale("log")
    return _finish(fig, ax, "learning rate", "smoothed training loss", "Range tests (shaded: chosen bounds)",
                   legend=bool(curves))


@_styled
def compare_bounds_figure(tables: pd.DataFrame, names: dict[str, str] | None = None) -> Figure:
    """base_lr-max_lr per run (rows) and rule (colours, rule_styles), on a log axis; the
    chosen rule drawn thick. `tables`: the bounds tables with a run_id column."""
    fig, ax = _subplots(figsize=(9, 0.6 * max(3, tables["run_id"].nunique() + 1) + 1.5))
    ok = tables[np.isfinite(tables["max_lr"].astype(float))] if len(tables) else tables
    runs = list(dict.fromkeys(tables["run_id"])) if len(tables) else []
    rules = list(dict.fromkeys(tables["rule"])) if len(tables) else []
    colors = {rule: color for rule, (color, _) in rule_styles(rules).items()}
    for _, row in ok.iterrows():
        y = runs.index(row["run_id"]) + (rules.index(row["rule"]) - (len(rules) - 1) / 2) * 0.15
        ax.plot([row["base_lr"], row["max_lr"]], [y, y], color=colors[row["rule"]],
                lw=5 if bool(row["selected"]) else 2, solid_capstyle="butt")
    for rule, color in colors.items():
        ax.plot([], [], color=color, lw=3, label=rule)
    ax.set_xscale("log")
    ax.set_yticks(range(len(runs)), [run_label(r, names) for r in runs])
    return _finish(fig, ax, "learning rate (base_lr - max_lr)", "run", "Suggested bounds per run and rule (thick: chosen)",
                   legend=bool(rules))
