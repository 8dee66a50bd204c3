"""Looking back at runs: compare an experiment's runs, and reproduce one run."""
from __future__ import annotations

import os
import shlex
import time
import typing
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from clr_mlflow.data import plugins
from clr_mlflow.tracking import history
from clr_mlflow.core import plots
from clr_mlflow.tracking import runs as tracking
from clr_mlflow.core.compare import leaderboard, verdict
from clr_mlflow.app.args import boolean
from clr_mlflow.app.config import ENTRY_POINTS, RANGE, Config, ConfigError

KEY_METRICS = ["bounds/base_lr", "bounds/max_lr", "range_test/iterations", "val/best_accuracy", "test/accuracy",
               "test/loss", "test/best_accuracy", "time/range_test_seconds", "time/train_seconds"]


def require_store() -> None:
    """compare, reproduce and resume read runs that must be there already: a tracking server
    that does not answer within 10 s, or a SQLite file (or its folder) that does not exist, is
    a one-line ConfigError, and nothing is created for it."""
    why = tracking.store_problem(timeout=10.0)  # (check_store would make a SQLite file)
    if why:
        raise ConfigError(why)


def require_consent(run_id: str, cfg: Config, allow_plugins: bool) -> None:
    """A run whose params name a plug-in (model= / data= `module:callable`) would import that
    module: refused unless the user said --allow-plugins."""
    code = plugins.named(model=cfg.model, data=cfg.data)
    if code and not allow_plugins:
        raise ConfigError(f"Expected --allow-plugins to run code that run {run_id} names, but it was not given: "
                          f"it would import {', '.join(code)} from installed packages or PYTHONPATH")


REJECTED = "rejected"  # clr_mlflow.kind of a run `mlflow run` made for a command that refused its input


@dataclass
class Comparison:
    board: pd.DataFrame
    target: float
    verdict: str
    run_id: str | None
    read_seconds: float
    note: str | None = None  # said when the comparison went elsewhere than the run `mlflow run` made


def compare_experiment(experiment: str, target: float = 0.0, log_run: bool = True) -> Comparison:
    """Leaderboard and plots for every run of `experiment`; logged into a run of its own
    (tag clr_mlflow.kind=compare, which later comparisons skip) unless log_run is false.

    Inside `mlflow run -e compare` MLflow has made a run already (MLFLOW_RUN_ID), in the
    experiment of --experiment-name (`Default` without it). That run is never listed, and is
    tagged clr_mlflow.kind=compare. When it is in `experiment`, the comparison is logged into
    it; otherwise into a new run of `experiment`, and `note` says so."""
    require_store()
    t0 = time.perf_counter()
    own = os.environ.get("MLFLOW_RUN_ID") or None
    experiment_id, runs = history.experiment_runs(experiment, exclude=(own,) if own else ())
    if "tags.clr_mlflow.kind" in runs:  # runs `mlflow run` made for a rejected input: no result
        runs = runs[runs["tags.clr_mlflow.kind"].fillna("") != REJECTED].reset_index(drop=True)
        if runs.empty:
            raise history.NoRuns(f"Experiment {experiment!r} has no runs to compare")
    ids = list(runs["run_id"])
    names = dict(zip(ids, runs["tags.mlflow.runName"] if "tags.mlflow.runName" in runs else [""] * len(ids)))
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
    run_id, note = None, None
    tags = {"clr_mlflow.kind": "compare"}
    if own:
        try:
            launched = history.run_record(own)
        except ValueError:
            launched = None
        if launched is not None and not (log_run and launched.experiment_id == experiment_id):
            # Not the run to log into: tag it as a comparison (no leaderboard lists it) and
            # end it; mlflow.start_run forgets MLFLOW_RUN_ID once it has resumed it.
            with tracking.active_run(experiment, "", {"clr_mlflow.kind": "compare",
                                                      "clr_mlflow.compare_experiment": experiment}):
                pass
            os.environ.pop("MLFLOW_RUN_ID", None)
            if log_run:
                note = (f"mlflow run made run {own} in experiment {launched.experiment!r}; the comparison of "
                        f"{experiment!r} is logged into a new run of {experiment!r} (pass --experiment-name "
                        f"{experiment} to mlflow run to have it in that run)")
                tags["clr_mlflow.launched_by"] = own
    if log_run:
        with tracking.active_run(experiment, "compare", tags) as run:
            run_id = run.info.run_id
            tracking.log_params({"experiment": experiment, "target_accuracy": target, "runs_compared": len(board)})
            tracking.log_table(board, "compare/leaderboard.json")
            tracking.log_frame_csv(board, "compare/leaderboard.csv")
            tracking.log_figure(plots.compare_accuracy_figure(acc_series, names), "compare/accuracy.png")
            tracking.log_figure(plots.compare_lr_figure(lr_series, names), "compare/lr.png")
            tracking.log_figure(plots.compare_range_tests_figure(curves, chosen, names), "compare/range_tests.png")
            tracking.log_figure(plots.compare_bounds_figure(tables, names), "compare/bounds.png")
            tracking.set_tags({"compare.verdict": line[:5000]})
    return Comparison(board, target, line, run_id, read_seconds, note)


MLFLOW_RUN_TAG = "mlflow.project.entryPoint"  # set on every run `mlflow run` made


def _parse(name: str, value: str, kind: type, shell_quoted: bool):
    """One param, as MLflow stores it, back to the type Config declares. `mlflow run` logs
    its entry point's values shell-quoted (shlex.quote: `'my images'`, `''` for empty);
    clr-mlflow logs str(value) as is, so those are taken verbatim."""
    text = value
    if shell_quoted:
        try:
            parts = shlex.split(value)
        except ValueError:
            parts = None
        if parts is None or len(parts) > 1:
            raise ConfigError(f"Expected param {name} to be one shell-quoted value as `mlflow run` logs it, "
                              f"but got {value!r}")
        text = parts[0] if parts else ""
    try:
        if kind is bool:
            return boolean(text)  # what the CLI accepted: true/on/t/y/1 ...
        if kind is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError(text)
            return int(number)
        return kind(text)
    except ValueError:
        words = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
        raise ConfigError(f"Expected param {name} to be {words.get(kind, kind.__name__)}, but got {text!r}") from None


def config_values(params: dict[str, str], shell_quoted: bool = False) -> dict:
    """The Config fields named in `params` (strings, as MLflow stores them), typed.
    `shell_quoted`: the params of a run `mlflow run` made (see _parse)."""
    hints = typing.get_type_hints(Config)
    return {f.name: _parse(f.name, params[f.name], hints[f.name], shell_quoted) for f in fields(Config)
            if f.name in params}


def config_of_run(params: dict[str, str], experiment: str, shell_quoted: bool = False, run_name: str = "") -> Config:
    """The Config a run was started with, from its params (as given, preset included)."""
    return Config(**(config_values(params, shell_quoted) | {"experiment": experiment, "run_name": run_name}))


def run_command(run: history.RunRecord) -> str | None:
    """The command (range-test, train, run) that made a run of ours, None for other runs."""
    tags = run.tags
    if tags.get("clr_mlflow.kind") in ("compare", "sweep", "resume"):
        return None
    return tags.get("clr_mlflow.command") or ENTRY_POINTS.get(tags.get(MLFLOW_RUN_TAG, ""))


def reproduction_name(original: str) -> str:
    """The name of a reproduction: its original's name, marked."""
    return f"{original} (reproduction)" if original else "reproduction"


@dataclass
class Reproduction:
    original: str
    outcome: object
    metrics: pd.DataFrame
    warnings: list[str]
    curve_identical: bool | None  # every curve both runs have identical; None: no curve to compare
    curve_note: str
    curves: dict[str, tuple[bool | None, str]] = field(default_factory=dict)  # per curve: identical?, note


def reproduce(run_id: str, allow_plugins: bool = False) -> Reproduction:
    """Run again with exactly `run_id`'s params into its experiment, named after it and
    tagged clr_mlflow.reproduces=run_id, and compare the key metrics and the full range-test
    and training curves (the curve.csv artifacts). A plug-in the run names is imported only
    with `allow_plugins`, and then not from the working directory (plugins.installed_only)."""
    from clr_mlflow.app.runner import execute

    require_store()
    try:
        run = history.run_record(run_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tags = run.tags
    command = run_command(run)
    if command is None:
        raise ConfigError(f"Expected RUN_ID to name a range-test or training run of clr_mlflow, but {run_id} is not")
    cfg = config_of_run(run.params, run.experiment, shell_quoted=MLFLOW_RUN_TAG in tags,
                        run_name=reproduction_name(run.name))
    require_consent(run_id, cfg, allow_plugins)
    warnings = []
    commit = tracking.git_commit()
    if tags.get("clr_mlflow.git_commit", "") != commit:
        warnings.append(f"code differs: original commit {tags.get('clr_mlflow.git_commit') or 'unknown'}, "
                        f"now {commit or 'unknown'}")
    with plugins.installed_only():
        outcome = execute(cfg, command, tags={"clr_mlflow.reproduces": run_id})
    new = history.run_record(outcome.run_id)
    if run.params.get("data.digest") != new.params.get("data.digest"):
        warnings.append(f"dataset differs: digest {run.params.get('data.digest')} then, "
                        f"{new.params.get('data.digest')} now")
    rows = [(k, run.metrics.get(k, np.nan), new.metrics.get(k, np.nan)) for k in KEY_METRICS
            if k in run.metrics or k in new.metrics]
    metrics = pd.DataFrame(rows, columns=["metric", "original", "reproduction"])
    metrics["difference"] = metrics["reproduction"] - metrics["original"]
    curves = {label: _same_curve(run_id, outcome.run_id, label, path, metric) for label, path, metric in CURVES}
    curves = {label: c for label, c in curves.items() if c[0] is not None or c[1]}
    if not curves:
        identical, note = None, "no range-test or training curve in these runs"
    else:
        known = [c[0] for c in curves.values() if c[0] is not None]
        identical = all(known) if known else None
        note = "; ".join(c[1] for c in curves.values())
    return Reproduction(run_id, outcome, metrics, warnings, identical, note, curves)


# label, the full-resolution CSV artifact, the (possibly thinned by log_every) loss metric
CURVES = (("range-test", history.RANGE_CURVE, "range_test/loss"), ("training", history.TRAIN_CURVE, "train/loss"))


def _same_curve(a: str, b: str, label: str, path: str, metric: str) -> tuple[bool | None, str]:
    """Whether runs a and b have the same curve, every column and iteration of their `path`
    CSV artifact (NaN equal to NaN), and a one-line note: identical (n iterations), or the
    first iteration where they differ. Without the CSV in either run, the `metric` series is
    compared instead (only every log_every-th iteration), and the note says so.
    (None, "") when neither run has this curve."""
    old, new = history.artifact_csv(a, path), history.artifact_csv(b, path)
    source = ""
    if old is None or new is None:
        old, new = (history.metric_series(r, metric).rename(columns={"step": "iteration", "value": "loss"})
                    for r in (a, b))
        if old.empty and new.empty:
            return None, ""
        source = f" (from the logged {metric} metric: {path} missing, only logged iterations compared)"
    columns = [c for c in old.columns if c in new.columns]
    n = min(len(old), len(new))
    x, y = old[columns].iloc[:n], new[columns].iloc[:n]
    differs = ~((x.to_numpy(float) == y.to_numpy(float)) | (x.isna().to_numpy() & y.isna().to_numpy()))
    rows = np.flatnonzero(differs.any(axis=1))
    seeds = old["seed"].nunique() if "seed" in old else 1

    def where(i: int) -> str:
        at = f"iteration {int(old['iteration'].iloc[i])}" if "iteration" in old else f"row {i}"
        return f"seed {old['seed'].iloc[i]} {at}" if seeds > 1 else at

    size = f"{len(old)} iterations" if seeds == 1 else f"{seeds} seeds, {len(old)} iterations in all"
    if len(rows):
        i = rows[0]
        col = columns[int(np.flatnonzero(differs[i])[0])]
        return False, (f"{label} curve differs: first at {where(i)} "
                       f"({col} {old[col].iloc[i]:.6g} vs {new[col].iloc[i]:.6g}){source}")
    if len(old) != len(new):
        return False, f"{label} curve differs: {len(old)} vs {len(new)} rows, equal up to {n}{source}"
    return True, f"{label} curve identical ({size}){source}"
