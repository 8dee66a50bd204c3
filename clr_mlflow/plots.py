"""Figures from data: nothing here computes a suggestion or talks to MLflow."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are saved, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


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
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedule")
    fig.tight_layout()
    return fig


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
