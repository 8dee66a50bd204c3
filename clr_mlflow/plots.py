"""Figures from data: nothing here computes a suggestion or talks to MLflow."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are saved, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def _finish(fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str, legend: bool) -> plt.Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def range_test_figure(curve: pd.DataFrame, bounds: pd.DataFrame, log_x: bool = True) -> plt.Figure:
    """Smoothed loss vs lr (raw loss faint), each rule's max_lr marked, chosen bounds shaded,
    held-out accuracy on a twin axis when it was measured."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.plot(curve["lr"], curve["loss"], color="tab:blue", alpha=0.25, lw=1, label="loss")
    ax.plot(curve["lr"], curve["smoothed_loss"], color="tab:blue", lw=2, label="smoothed loss")
    if log_x:
        ax.set_xscale("log")
    finite = curve["smoothed_loss"][np.isfinite(curve["smoothed_loss"])]
    if len(finite):
        lo, hi = finite.min(), finite.max()
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), min(hi, 4 * finite.iloc[0]) + 0.1 * (hi - lo + 1e-12))
    palette = sns.color_palette("deep", len(bounds))
    for color, row in zip(palette, bounds.itertuples()):
        if np.isfinite(row.max_lr):
            ax.axvline(row.max_lr, color=color, ls="--", lw=1.2, label=f"{row.rule}: max_lr {row.max_lr:.3g}")
        if row.selected and np.isfinite(row.base_lr) and np.isfinite(row.max_lr):
            ax.axvspan(row.base_lr, row.max_lr, color=color, alpha=0.12,
                       label=f"chosen ({row.rule}): {row.base_lr:.3g} - {row.max_lr:.3g}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    handles, labels = ax.get_legend_handles_labels()
    acc = curve.dropna(subset=["accuracy"]) if "accuracy" in curve else curve.iloc[:0]
    if len(acc):
        ax2 = ax.twinx()
        ax2.plot(acc["lr"], acc["accuracy"], "o-", color="tab:green", ms=3, lw=1.2, label="held-out accuracy")
        ax2.set_ylabel("held-out accuracy")
        ax2.grid(False)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    ax.set_title("LR range test")
    fig.tight_layout()
    return fig


def schedule_figure(lrs: np.ndarray, cycle_len: int | None) -> plt.Figure:
    """lr per iteration, with cycle boundaries marked."""
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(np.arange(len(lrs)), lrs, lw=1.5)
    if cycle_len:
        for b in range(cycle_len, len(lrs), cycle_len):
            ax.axvline(b, color="grey", ls=":", lw=1)
    return _finish(fig, ax, "iteration", "learning rate", "Learning-rate schedule", legend=False)


def training_figure(epochs: pd.DataFrame, lrs: np.ndarray) -> plt.Figure:
    """Train/val loss and accuracy per epoch (x = iteration), lr on a twin axis."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
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
    fig.suptitle("Training")
    fig.tight_layout()
    return fig


def _policy_palette(policies) -> dict:
    names = sorted({str(p) for p in policies})
    return dict(zip(names, sns.color_palette("deep", len(names))))


def _runs_overlay(series: pd.DataFrame, ylabel: str, title: str, step_offset: int = 0, **style) -> plt.Figure:
    """One line per run, coloured by policy. `series`: columns run, policy, step, value."""
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = _policy_palette(series["policy"])
    for (run, policy), g in series.groupby(["run", "policy"], sort=False):
        ax.plot(g["step"] + step_offset, g["value"], color=colors[str(policy)], label=f"{policy} ({run[:8]})", **style)
    return _finish(fig, ax, "iteration", ylabel, title, legend=len(series) > 0)


def compare_accuracy_figure(series: pd.DataFrame) -> plt.Figure:
    """Test accuracy vs iterations run (step + 1), one line per run, coloured by policy."""
    return _runs_overlay(series, "test accuracy", "Test accuracy per run", step_offset=1, marker="o", ms=2.5, lw=1.3)


def compare_lr_figure(series: pd.DataFrame) -> plt.Figure:
    """The runs' lr schedules overlaid."""
    return _runs_overlay(series, "learning rate", "Learning-rate schedules", lw=1.2, alpha=0.85)


def compare_range_tests_figure(curves: dict[str, pd.DataFrame], chosen: pd.DataFrame) -> plt.Figure:
    """Range-test curves (smoothed loss vs lr) overlaid, each run's chosen bounds shaded in
    its colour. `chosen`: columns run_id, base_lr, max_lr."""
    fig, ax = plt.subplots(figsize=(9, 5))
    palette = sns.color_palette("husl", max(1, len(curves)))
    for color, (run, curve) in zip(palette, curves.items()):
        ax.plot(curve["lr"], curve["smoothed_loss"], lw=1.5, color=color, label=run[:8])
        row = chosen[chosen["run_id"] == run]
        if len(row) and np.isfinite(row["max_lr"].iloc[0]):
            ax.axvspan(row["base_lr"].iloc[0], row["max_lr"].iloc[0], color=color, alpha=0.08)
    ax.set_xscale("log")
    return _finish(fig, ax, "learning rate", "smoothed training loss", "Range tests (shaded: chosen bounds)",
                   legend=bool(curves))


def compare_bounds_figure(tables: pd.DataFrame) -> plt.Figure:
    """base_lr-max_lr per run (rows) and rule (colours), on a log axis; the chosen rule
    drawn thick. `tables`: the bounds tables with a run_id column."""
    fig, ax = plt.subplots(figsize=(9, 0.6 * max(3, tables["run_id"].nunique() + 1) + 1.5))
    ok = tables[np.isfinite(tables["max_lr"].astype(float))] if len(tables) else tables
    runs = list(dict.fromkeys(tables["run_id"])) if len(tables) else []
    rules = list(dict.fromkeys(tables["rule"])) if len(tables) else []
    colors = dict(zip(rules, sns.color_palette("deep", max(1, len(rules)))))
    for _, row in ok.iterrows():
        y = runs.index(row["run_id"]) + (rules.index(row["rule"]) - (len(rules) - 1) / 2) * 0.15
        ax.plot([row["base_lr"], row["max_lr"]], [y, y], color=colors[row["rule"]],
                lw=5 if bool(row["selected"]) else 2, solid_capstyle="butt")
    for rule, color in colors.items():
        ax.plot([], [], color=color, lw=3, label=rule)
    ax.set_xscale("log")
    ax.set_yticks(range(len(runs)), [r[:8] for r in runs])
    return _finish(fig, ax, "learning rate (base_lr - max_lr)", "run", "Suggested bounds per run and rule (thick: chosen)",
                   legend=bool(rules))
