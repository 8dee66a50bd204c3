"""Looking back at runs: compare an experiment's runs, and reproduce one run."""
from __future__ import annotations

import shlex
import time
import typing
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from . import history, plots, tracking
from .compare import leaderboard, verdict
from .config import ENTRY_POINTS, RANGE, Config, ConfigError

KEY_METRICS = ["bounds/base_lr", "bounds/max_lr", "range_test/iterations", "test/accuracy", "test/best_accuracy",
               "time/range_test_seconds", "time/train_seconds"]


@dataclass
class Comparison:
    board: pd.DataFrame
    target: float
    verdict: str
    run_id: str | None
    read_seconds: float


def compare_experiment(experiment: str, target: float = 0.0, log_run: bool = True) -> Comparison:
    """Leaderboard and plots for every run of `experiment`; logged into a run of its own
    (tag clr_mlflow.kind=compare, which later comparisons skip) unless log_run is false."""
    t0 = time.perf_counter()
    experiment_id, runs = history.experiment_runs(experiment)
    ids = list(runs["run_id"])
    policy = dict(zip(ids, runs["params.policy"] if "params.policy" in runs else [None] * len(ids)))
    acc, lrs = {}, []
    for run_id in ids:
        acc[run_id] = history.metric_series(run_id, "val/accuracy")
        if policy[run_id] is not None and not pd.isna(policy[run_id]):
            lr = history.metric_series(run_id, "train/lr")
            lrs.append(lr.assign(run=run_id, policy=policy[run_id]))
    kinds = runs["tags.clr_mlflow.kind"] if "tags.clr_mlflow.kind" in runs else pd.Series("", index=runs.index)
    tables = history.bounds_tables(experiment_id, list(runs.loc[kinds.fillna("").str.contains(RANGE), "run_id"]))
    curves = {r: c for r in ids if (c := history.range_curve(r)) is not None}
    read_seconds = time.perf_counter() - t0

    board, target = leaderboard(runs, acc, target or None)
    line = verdict(board, target)
    acc_series = pd.concat([a.assign(run=r, policy=policy[r]) for r, a in acc.items() if len(a)] or
                           [pd.DataFrame(columns=["step", "value", "run", "policy"])])
    lr_series = pd.concat(lrs or [pd.DataFrame(columns=["step", "value", "run", "policy"])])
    chosen = tables[tables["selected"].astype(bool)] if len(tables) else tables
    run_id = None
    if log_run:
        with tracking.active_run(experiment, "compare", {"clr_mlflow.kind": "compare"}) as run:
            run_id = run.info.run_id
            tracking.log_params({"experiment": experiment, "target_accuracy": target, "runs_compared": len(board)})
            tracking.log_table(board, "compare/leaderboard.json")
            tracking.log_frame_csv(board, "compare/leaderboard.csv")
            tracking.log_figure(plots.compare_accuracy_figure(acc_series), "compare/accuracy.png")
            tracking.log_figure(plots.compare_lr_figure(lr_series), "compare/lr.png")
            tracking.log_figure(plots.compare_range_tests_figure(curves, chosen), "compare/range_tests.png")
            tracking.log_figure(plots.compare_bounds_figure(tables), "compare/bounds.png")
            tracking.set_tags({"compare.verdict": line[:5000]})
    return Comparison(board, target, line, run_id, read_seconds)


def _parse(value: str, kind: type):
    text = shlex.split(value)[0] if value.strip() else ""  # `mlflow run` logs shell-quoted values ('' for empty)
    if kind is bool:
        return text.lower() in ("true", "1", "yes")
    if kind is int:
        return int(float(text))
    return kind(text)


def config_values(params: dict[str, str]) -> dict:
    """The Config fields named in `params` (strings, as MLflow stores them), typed."""
    hints = typing.get_type_hints(Config)
    return {f.name: _parse(params[f.name], hints[f.name]) for f in fields(Config) if f.name in params}


def config_of_run(params: dict[str, str], experiment: str) -> Config:
    """The Config a run was started with, from its params (as given, preset included)."""
    return Config(**(config_values(params) | {"experiment": experiment, "run_name": ""}))


@dataclass
class Reproduction:
    original: str
    outcome: object
    metrics: pd.DataFrame
    warnings: list[str]
    curve_identical: bool | None
    curve_note: str


def reproduce(run_id: str) -> Reproduction:
    """Run again with exactly `run_id`'s params into its experiment, tagged
    clr_mlflow.reproduces=run_id, and compare the key metrics and the range-test curve."""
    from .runner import execute

    try:
        run = history.run_record(run_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tags = run.tags
    command = tags.get("clr_mlflow.command") or ENTRY_POINTS.get(tags.get("mlflow.project.entryPoint", ""))
    if command is None or tags.get("clr_mlflow.kind") == "compare":
        raise ConfigError(f"Expected RUN_ID to name a range-test or training run of clr_mlflow, but {run_id} is not")
    cfg = config_of_run(run.params, run.experiment)
    warnings = []
    commit = tracking.git_commit()
    if tags.get("clr_mlflow.git_commit", "") != commit:
        warnings.append(f"code differs: original commit {tags.get('clr_mlflow.git_commit') or 'unknown'}, "
                        f"now {commit or 'unknown'}")
    outcome = execute(cfg, command, tags={"clr_mlflow.reproduces": run_id})
    new = history.run_record(outcome.run_id)
    if run.params.get("data.digest") != new.params.get("data.digest"):
        warnings.append(f"dataset differs: digest {run.params.get('data.digest')} then, "
                        f"{new.params.get('data.digest')} now")
    rows = [(k, run.metrics.get(k, np.nan), new.metrics.get(k, np.nan)) for k in KEY_METRICS
            if k in run.metrics or k in new.metrics]
    metrics = pd.DataFrame(rows, columns=["metric", "original", "reproduction"])
    metrics["difference"] = metrics["reproduction"] - metrics["original"]
    identical, note = _same_curve(run_id, outcome.run_id)
    return Reproduction(run_id, outcome, metrics, warnings, identical, note)


def _same_curve(a: str, b: str) -> tuple[bool | None, str]:
    old, new = (history.metric_series(r, "range_test/loss") for r in (a, b))
    if old.empty and new.empty:
        return None, "no range test in this run"
    if len(old) == len(new) and np.array_equal(old["value"].to_numpy(), new["value"].to_numpy()):
        return True, f"range-test curve identical ({len(old)} iterations)"
    n = min(len(old), len(new))
    diff = np.flatnonzero(old["value"].to_numpy()[:n] != new["value"].to_numpy()[:n])
    where = f"first at iteration {diff[0]}" if len(diff) else f"lengths {len(old)} vs {len(new)}"
    return False, f"range-test curve differs ({where})"
