"""The leaderboard: which policy and which bounds won, from the runs' logged values."""
from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ["run_id", "run_name", "status", "policy", "bounds_rule", "base_lr", "max_lr", "iterations",
           "best_val_accuracy", "test_accuracy", "iters_to_target", "wall_seconds"]
INT_COLUMNS = ["iterations", "iters_to_target"]  # counts: pandas' nullable Int64, so "92", not "92.0"
NOT_REACHED = "not reached"


def iters_to_target(steps, accuracies, target: float) -> float:
    """Iterations run when accuracy first reached `target` (step is the 0-based index of
    the epoch's last iteration, so iterations = step + 1); NaN if it never did."""
    hit = np.flatnonzero(np.asarray(accuracies, dtype=float) >= target)
    return float(np.asarray(steps)[hit[0]] + 1) if len(hit) else float("nan")


def _col(runs: pd.DataFrame, name: str, default=np.nan) -> pd.Series:
    return runs[name] if name in runs else pd.Series(default, index=runs.index)


def _metric(runs: pd.DataFrame, *names: str) -> pd.Series:
    """The first of `names` a run logged (newer names first, then what older runs used)."""
    out = pd.Series(np.nan, index=runs.index, dtype=float)
    for name in reversed(names):
        values = pd.to_numeric(_col(runs, f"metrics.{name}"), errors="coerce")
        out = values.where(values.notna(), out)
    return out


def default_target(board: pd.DataFrame, accuracy: dict[str, pd.DataFrame]) -> float:
    """The paper's yardstick: the final validation accuracy of the `fixed` run (the best,
    if several), on the same val/accuracy history iters_to_target reads; NaN without one."""
    finals = [float(accuracy[r]["value"].iloc[-1]) for r in board.loc[board["policy"] == "fixed", "run_id"]
              if r in accuracy and len(accuracy[r])]
    return max(finals) if finals else float("nan")


def leaderboard(runs: pd.DataFrame, accuracy: dict[str, pd.DataFrame], target: float | None = None) -> tuple[pd.DataFrame, float]:
    """One row per run, best validation accuracy first. `runs` is what mlflow.search_runs
    returns; `accuracy` maps run id -> its val/accuracy history (columns step, value). With
    no `target` (or 0), the target is the fixed run's final validation accuracy.
    best_val_accuracy is val/best_accuracy (test/best_accuracy in runs made before the
    validation split); test_accuracy is test/accuracy, the test split after training."""
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
        "best_val_accuracy": _metric(runs, "val/best_accuracy", "test/best_accuracy"),
        "test_accuracy": _metric(runs, "test/accuracy"),
        "wall_seconds": train_s.fillna(0) + range_s.fillna(0),
    })
    board.loc[train_s.isna() & range_s.isna(), "wall_seconds"] = np.nan
    if not target:
        target = default_target(board, accuracy)
    board["iters_to_target"] = [
        iters_to_target(accuracy[r]["step"], accuracy[r]["value"], target)
        if np.isfinite(target) and r in accuracy and len(accuracy[r]) else np.nan
        for r in board["run_id"]
    ]
    for column in INT_COLUMNS:  # whole numbers, with <NA> where unknown (written as "" in CSV)
        board[column] = pd.to_numeric(board[column], errors="coerce").round().astype("Int64")
    board = board.sort_values(["best_val_accuracy", "iters_to_target"], ascending=[False, True], na_position="last")
    return board[COLUMNS].reset_index(drop=True), float(target)


def display_board(board: pd.DataFrame, target: float, float_format: str = "{:.4g}") -> pd.DataFrame:
    """The leaderboard as printed, every cell a string: run ids cut to 8 characters, counts
    as integers, unknown values blank, and "not reached" in iters_to_target for runs that
    trained but never reached the target accuracy."""
    out = pd.DataFrame(index=board.index)
    for column in board.columns:
        values = board[column]
        if column in INT_COLUMNS:
            text = values.map(lambda v: "" if pd.isna(v) else str(int(v)))
        elif pd.api.types.is_float_dtype(values):
            text = values.map(lambda v: "" if pd.isna(v) else float_format.format(v))
        else:
            text = values.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
        out[column] = text
    out["run_id"] = out["run_id"].str[:8]
    if np.isfinite(target):
        out.loc[board["best_val_accuracy"].notna() & board["iters_to_target"].isna(), "iters_to_target"] = NOT_REACHED
    return out


def _who(row) -> str:
    name = row["run_name"] if isinstance(row["run_name"], str) and row["run_name"] else ""
    return f"run {name} {row['run_id'][:8]}" if name else f"run {row['run_id'][:8]}"


def verdict(board: pd.DataFrame, target: float) -> str:
    trained = board.dropna(subset=["best_val_accuracy"])
    if trained.empty:
        return "no run in this experiment trained a model (range tests only)"
    best = trained.iloc[0]
    line = f"best: {best['policy']} ({_who(best)}) at {best['best_val_accuracy']:.4f} validation accuracy"
    if np.isfinite(best["test_accuracy"]):
        line += f" (test {best['test_accuracy']:.4f})"
    reached = trained.dropna(subset=["iters_to_target"])
    if np.isfinite(target) and len(reached):
        fastest = reached.sort_values("iters_to_target").iloc[0]
        line += (f"; fastest to {target:.4f} validation accuracy: {fastest['policy']} ({_who(fastest)}) "
                 f"in {int(fastest['iters_to_target'])} iterations")
    return line
