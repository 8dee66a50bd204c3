"""The leaderboard: which policy and which bounds won, from the runs' logged values."""
from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ["run_id", "run_name", "status", "policy", "bounds_rule", "base_lr", "max_lr", "iterations",
           "best_accuracy", "final_accuracy", "iters_to_target", "wall_seconds"]


def iters_to_target(steps, accuracies, target: float) -> float:
    """Iterations run when accuracy first reached `target` (step is the 0-based index of
    the epoch's last iteration, so iterations = step + 1); NaN if it never did."""
    hit = np.flatnonzero(np.asarray(accuracies, dtype=float) >= target)
    return float(np.asarray(steps)[hit[0]] + 1) if len(hit) else float("nan")


def _col(runs: pd.DataFrame, name: str, default=np.nan) -> pd.Series:
    return runs[name] if name in runs else pd.Series(default, index=runs.index)


def default_target(board: pd.DataFrame) -> float:
    """The paper's yardstick: the final accuracy of the `fixed` run (the best, if several);
    NaN when there is none."""
    fixed = board.loc[board["policy"] == "fixed", "final_accuracy"].dropna()
    return float(fixed.max()) if len(fixed) else float("nan")


def leaderboard(runs: pd.DataFrame, accuracy: dict[str, pd.DataFrame], target: float | None = None) -> tuple[pd.DataFrame, float]:
    """One row per run, best test accuracy first. `runs` is what mlflow.search_runs returns;
    `accuracy` maps run id -> its val/accuracy history (columns step, value). With no
    `target` (or 0), the target is the fixed run's final accuracy."""
    train_s = pd.to_numeric(_col(runs, "metrics.time/train_seconds"), errors="coerce")
    range_s = pd.to_numeric(_col(runs, "metrics.time/range_test_seconds"), errors="coerce")
    board = pd.DataFrame({
        "run_id": runs["run_id"],
        "run_name": _col(runs, "tags.mlflow.runName", ""),
        "status": runs["status"],
        "policy": _col(runs, "params.policy", None),
        "bounds_rule": _col(runs, "tags.bounds_rule", None),
        "base_lr": pd.to_numeric(_col(runs, "metrics.bounds/base_lr"), errors="coerce"),
        "max_lr": pd.to_numeric(_col(runs, "metrics.bounds/max_lr"), errors="coerce"),
        "iterations": pd.to_numeric(_col(runs, "params.total_iters"), errors="coerce"),
        "best_accuracy": pd.to_numeric(_col(runs, "metrics.test/best_accuracy"), errors="coerce"),
        "final_accuracy": pd.to_numeric(_col(runs, "metrics.test/accuracy"), errors="coerce"),
        "wall_seconds": train_s.fillna(0) + range_s.fillna(0),
    })
    board.loc[train_s.isna() & range_s.isna(), "wall_seconds"] = np.nan
    if not target:
        target = default_target(board)
    board["iters_to_target"] = [
        iters_to_target(accuracy[r]["step"], accuracy[r]["value"], target)
        if np.isfinite(target) and r in accuracy and len(accuracy[r]) else np.nan
        for r in board["run_id"]
    ]
    board = board.sort_values(["best_accuracy", "iters_to_target"], ascending=[False, True], na_position="last")
    return board[COLUMNS].reset_index(drop=True), float(target)


def verdict(board: pd.DataFrame, target: float) -> str:
    trained = board.dropna(subset=["best_accuracy"])
    if trained.empty:
        return "no run in this experiment trained a model (range tests only)"
    best = trained.iloc[0]
    line = f"best: {best['policy']} (run {best['run_id'][:8]}) at {best['best_accuracy']:.4f} test accuracy"
    reached = trained.dropna(subset=["iters_to_target"])
    if np.isfinite(target) and len(reached):
        fastest = reached.sort_values("iters_to_target").iloc[0]
        line += (f"; fastest to {target:.4f}: {fastest['policy']} (run {fastest['run_id'][:8]}) "
                 f"in {int(fastest['iters_to_target'])} iterations")
    return line
