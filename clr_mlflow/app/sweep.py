"""`clr-mlflow sweep`: range tests, then one training per setting x bounds rule x policy, each
a Ray Tune trial and a complete MLflow run (what `range-test` / `train` make) under one
parent run (tag clr_mlflow.kind=sweep) that gets the leaderboard and comparison plots.

A setting is a seed and one value of every --grid key. Rules, policies and training-only
keys do not change a range test, so each seed x range-test grid value gets one; the first
rule trains with `bounds_from` it, the others with their row of its bounds table. Settings
with known bounds (base_lr/max_lr, bounds_from, a preset) train without a range test."""
from __future__ import annotations

import itertools
import os
import tempfile
import time
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from clr_mlflow.data import plugins
from clr_mlflow.app.args import MAX_TRIALS, plural
from clr_mlflow.app.config import COMMANDS, RANGE, Config, ConfigError, validate
from clr_mlflow.app.presets import apply_preset
from clr_mlflow.app.ray_cluster import SweepError, check_resources, ray_modules, ray_settings, start_ray
from clr_mlflow.app.sweep_trial import ERROR, METRIC, OUTCOME, PARENT, SETTING, TRIAL, close_runs, run_trial

LISTED = {"policy": "--policies", "bounds_rule": "--bounds-rules", "seed": "--seeds"}  # the sweep's own lists


def parse_grid(items) -> dict[str, list]:
    """`KEY=V1,V2` strings (also several in one, joined by ';' as MLproject passes them)."""
    grid = {}
    for part in filter(None, (p.strip() for item in items for p in item.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values or key in grid:
            raise ConfigError(f"Expected --grid KEY=V1,V2 with each KEY once, but got {part!r}")
        grid[key] = [v.strip() for v in values.split(",")]
    return typed_grid(grid)


def typed_grid(grid: dict) -> dict[str, list]:
    """Values typed as Config declares them (strings through review.config_values, the path
    params take back to a Config); a key the sweep sets otherwise is a ConfigError."""
    from clr_mlflow.app.review import config_values

    hints = typing.get_type_hints(Config)
    for key, values in grid.items():
        if key not in hints or key in (*LISTED, "experiment", "run_name") or not len(values):
            raise ConfigError(f"Expected --grid keys to be parameters other than policy, bounds_rule, seed, experiment "
                              f"and run_name, with values, but got {key!r} ({LISTED.get(key, 'see --help')})")
    return {k: [config_values({k: v})[k] if isinstance(v, str) and hints[k] is not str else v for v in vs]
            for k, vs in grid.items()}


def _label(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def _knows_bounds(cfg: Config) -> bool:
    known = apply_preset(cfg)[0]
    return known.max_lr > 0 or bool(known.bounds_from)


def settings(base: Config, grid: dict, policies, rules, seeds) -> list[dict]:
    """Every seed x grid combination, checked with every policy and rule: a bad value is a
    one-line ConfigError naming its setting, before Ray starts or any run exists."""
    if not (policies and rules and seeds):
        raise ConfigError("Expected at least one policy, bounds rule and seed, but got an empty list")
    out = [{"seed": s} | dict(zip(grid, vs)) for s in seeds for vs in itertools.product(*grid.values())]
    for s, p in itertools.product(out, policies):
        cfg = replace(base, **s, policy=p)
        known = _knows_bounds(cfg)
        try:
            for c in [cfg] if known else [replace(cfg, bounds_rule=r) for r in rules]:
                validate(apply_preset(c)[0], COMMANDS["train" if known else "run"], require_bounds=known)
        except ConfigError as e:
            raise ConfigError(f"{_label(s)} policy={p}: {e}") from None
    return out


@dataclass
class SweepResult:
    run_id: str
    experiment: str
    trials: pd.DataFrame  # per trial: key, command, setting, rule, policy, run_id, outcome, error
    board: pd.DataFrame  # compare.leaderboard of the trainings, with their setting
    target: float
    verdict: str
    seconds: float

    def count(self, outcome: str) -> int:
        return int((self.trials["outcome"] == outcome).sum())

    def summary(self) -> str:
        parts = [f"sweep run {self.run_id}"]
        for command, word in (("range-test", "range test"), ("train", "training")):
            n = self.trials.loc[self.trials["command"] == command, "outcome"].value_counts()
            if n.sum():
                parts.append(f"{plural(n.sum(), word)}: " + ", ".join(
                    f"{n[o]} {o.replace('_', ' ')}" for o in ("finished", "failed", "early_stopped") if o in n))
        return " | ".join(parts + [f"{self.seconds:.1f}s"])


def sweep(base: Config, grid: dict[str, list], policies: list[str], bounds_rules: list[str], seeds: list[int], *,
          ray_address: str | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
          max_concurrent: int | None = None, early_stop: bool = False, experiment: str | None = None,
          max_trials: int = MAX_TRIALS) -> SweepResult:
    """The sweep of the module docstring into `experiment` (default base.experiment). A trial
    that fails leaves its run FAILED with tag clr_mlflow.error, and the sweep goes on. Before
    the parent run exists: more than `max_trials` trials, a Ray address nothing answers at,
    or resources per trial beyond the cluster's are each a one-line error."""
    ray, tune = ray_modules()
    t0 = time.perf_counter()
    policies, rules, seeds = (list(dict.fromkeys(x)) for x in (policies, bounds_rules, seeds))
    if "tuned" in rules:  # a sweep compares rules itself; `tuned` trains candidates inside one run
        raise SweepError("Expected --bounds-rules to name rules (tuned: clr-mlflow run), but got tuned")
    grid, base = typed_grid(grid), replace(base, experiment=experiment or base.experiment)
    least = len(seeds) * len(policies) * int(np.prod([len(v) for v in grid.values()]))  # one training each
    if least > max_trials:  # before settings() checks every one of them
        _too_many(least, max_trials, "at least ")
    combos = settings(base, grid, policies, rules, seeds)
    if (n := count_trials(base, combos, grid, policies, rules)) > max_trials:
        _too_many(n, max_trials)
    with ray_settings():
        return _sweep(ray, tune, base, grid, policies, rules, seeds, combos, ray_address, cpus_per_trial,
                      gpus_per_trial, max_concurrent, early_stop, t0)


def _sweep(ray, tune, base, grid, policies, rules, seeds, combos, ray_address, cpus_per_trial, gpus_per_trial,
           max_concurrent, early_stop, t0) -> SweepResult:
    from clr_mlflow.tracking import history, runs as tracking

    started = start_ray(ray, ray_address)
    try:
        check_resources(ray, cpus_per_trial, gpus_per_trial)
        tags = tracking.provenance_tags(base.device) | {"clr_mlflow.kind": "sweep", "clr_mlflow.command": "sweep"}
        # This also makes the store's schema and the experiment before trials write at once.
        with tracking.active_run(base.experiment, base.run_name or "sweep", tags) as parent:
            pid = parent.info.run_id
            record = history.run_record(pid)  # under `mlflow run`, its run: the experiment is its
            tracking.log_params({k: v for k, v in base.params(COMMANDS["run"]).items() if k not in (*LISTED, "seeds")}
                                | {"policies": ",".join(policies), "bounds_rules": ",".join(rules),
                                   "seeds": ",".join(map(str, seeds)), "early_stop": early_stop,
                                   "grid": ";".join(f"{k}={','.join(map(str, v))}" for k, v in grid.items()),
                                   "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
                                   "max_concurrent": max_concurrent or 0})
            stage = _Stage(ray, tune, record.experiment, pid, {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
                           max_concurrent, dict(tracking_uri=history.location(pid).tracking_uri, cwd=os.getcwd()))
            keys = ["seed"] + [k for k in grid if RANGE in Config.__dataclass_fields__[k].metadata["phases"]]
            ranges = _range_tests(stage, base, combos, keys, rules[0])
            tables = history.bounds_tables(record.experiment_id, [o[0] for o in ranges.values() if o[1] == "finished"])
            specs = _trainings(stage, base, combos, keys, rules, policies, ranges, tables)
            scheduler = None
            if early_stop:  # max_t: no cap of ASHA's own, the config says how long a training is
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(metric=METRIC, mode="max", max_t=10**9, grace_period=1)
            stage.run(specs, "training", scheduler)
            board, target, line = _log_comparison(record.experiment, record.experiment_id, pid, stage.trials)
            result = SweepResult(pid, record.experiment, stage.trials, board, target, line, time.perf_counter() - t0)
            tracking.log_metrics({f"sweep/{o}": result.count(o) for o in ("finished", "failed", "early_stopped")})
            tracking.set_tags({"compare.verdict": line[:5000], "sweep.summary": result.summary()[:5000]})
    finally:
        if started:
            ray.shutdown()
    return result


def _too_many(n: int, max_trials: int, least: str = "") -> None:
    raise ConfigError(f"Expected at most --max-trials={max_trials} trials, but this sweep makes {least}{n:,}: "
                      f"pass --max-trials {n} (or more) to run them all")


def count_trials(base: Config, combos: list[dict], grid: dict, policies: list, rules: list) -> int:
    """How many trials the sweep makes: a range test per setting of its range-test keys whose
    bounds are unknown, and a training per setting x (rule) x policy."""
    keys = ["seed"] + [k for k in grid if RANGE in Config.__dataclass_fields__[k].metadata["phases"]]
    unknown = [s for s in combos if not _knows_bounds(replace(base, **s))]
    tests = len({_label({k: s[k] for k in keys}) for s in unknown})
    return tests + len(policies) * (len(unknown) * len(rules) + len(combos) - len(unknown))


def _range_tests(stage, base: Config, combos: list[dict], keys: list[str], rule: str) -> dict[str, tuple]:
    """One range test (choosing `rule`) per setting of the range-test `keys` whose bounds are
    unknown: {setting label: (run id, outcome, error)}."""
    tested = {_label(v): v for v in ({k: s[k] for k in keys} for s in combos if not _knows_bounds(replace(base, **s)))}
    specs = [stage.spec(replace(base, **v, bounds_rule=rule, run_name=f"range-test {label}"), "range-test", f"r{i:03d}",
                        label) for i, (label, v) in enumerate(tested.items())]
    return dict(zip(tested, stage.run(specs, "range test")))


def _trainings(stage, base, combos, keys, rules, policies, ranges, tables) -> list[dict]:
    """Per setting, rule (none with known bounds) and policy: a training's spec."""
    specs = []
    for s in combos:
        known, label = _knows_bounds(replace(base, **s)), _label(s)
        for rule, policy in itertools.product([""] if known else rules, policies):
            cfg, params, error = replace(base, **s, policy=policy), {}, ""
            if not known:
                cfg, params, error = _bounds(cfg, rule, rules[0], ranges[_label({k: s[k] for k in keys})], tables)
            cfg = replace(cfg, run_name=" ".join(x for x in (label, rule, policy) if x))
            specs.append(stage.spec(cfg, "train", f"t{len(specs):03d}", label, rule, params, error))
    return specs


def _bounds(cfg: Config, rule: str, first: str, range_run: tuple, tables: pd.DataFrame) -> tuple[Config, dict, str]:
    """A training's config for `rule` on its setting's range test, the params to log before
    the runner's, and an error known in advance."""
    run_id, outcome, _ = range_run
    if outcome != "finished":
        return cfg, {}, f"its range test, run {run_id}, {outcome}"
    if rule == first:  # the rule the range test chose: bounds_from, as `clr-mlflow train` takes it
        return replace(cfg, bounds_from=run_id), {}, ""
    row = tables[(tables["run_id"] == run_id) & (tables["rule"] == rule)] if len(tables) else tables
    if row.empty or not np.isfinite(float(row["max_lr"].iloc[0])):
        note = row["note"].iloc[0] if len(row) else "no row for it"
        return cfg, {}, f"bounds_rule {rule} found no bounds on range test run {run_id}: {note}"
    return (replace(cfg, base_lr=float(row["base_lr"].iloc[0]), max_lr=float(row["max_lr"].iloc[0])),
            {"bounds_source": f"run:{run_id} rule:{rule}"}, "")


class _Stage:
    """Runs trials on Tune, then makes sure each has one closed run tagged with its outcome."""

    def __init__(self, ray, tune, experiment, parent, resources, max_concurrent, env):
        self.ray, self.tune, self.experiment, self.parent, self.env = ray, tune, experiment, parent, env
        self.resources, self.max_concurrent, self.rows = resources, max_concurrent, []

    def spec(self, cfg: Config, command: str, key: str, setting: str, rule="", params=None, error="") -> dict:
        cfg = replace(cfg, experiment=self.experiment, data_dir=str(Path(cfg.data_dir).resolve()))
        if cfg.data != "cifar10" and not plugins.is_plugin(cfg.data) and Path(cfg.data).exists():
            cfg = replace(cfg, data=str(Path(cfg.data).resolve()))  # trials run elsewhere, maybe on other machines
        return self.env | {"key": key, "command": command, "setting": setting, "rule": rule, "error": error,
                           "params": params or {}, "config": {f.name: getattr(cfg, f.name) for f in fields(Config)},
                           "tags": {PARENT: self.parent, TRIAL: key, SETTING: setting, "clr_mlflow.command": command,
                                    "clr_mlflow.kind": "+".join(COMMANDS[command])},
                           "final": {"bounds_rule": rule} if rule else {}}

    def run(self, specs: list[dict], word: str, scheduler=None) -> list[tuple]:
        """(run id, outcome, error) per spec; a worker process per slot, reused trial to trial."""
        if not specs:
            return []
        print(f"== {len(specs)} {word}{'s' if len(specs) > 1 else ''} on Ray Tune")
        tune, name = self.tune, (lambda trial: trial.config["trial"]["key"])
        with tempfile.TemporaryDirectory(prefix="clr_mlflow_tune_") as storage:  # MLflow keeps the record
            results = tune.Tuner(
                tune.with_resources(run_trial, self.resources), param_space={"trial": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=self.max_concurrent or None,
                                            trial_name_creator=name, trial_dirname_creator=name, reuse_actors=True),
                run_config=tune.RunConfig(name="sweep", storage_path=storage, verbose=0,
                                          callbacks=[_progress(len(specs))])).fit()
        crashed = {r.config["trial"]["key"]: f"{type(r.error).__name__}: {r.error}" for r in results if r.error}
        runs = _children(self.experiment, self.parent)
        got = pd.DataFrame({"run_id": runs["run_id"], "status": runs["status"], "outcome": _tag(runs, OUTCOME),
                            "error": _tag(runs, ERROR)}).set_axis(_tag(runs, TRIAL).to_numpy())
        got = got[~got.index.duplicated(keep="last")]
        out, leftovers = [], []
        for sp in specs:
            run_id, status, outcome, error = got.loc[sp["key"]] if sp["key"] in got.index else (None, "", "", "")
            if not outcome or status == "RUNNING":
                # Its process ended inside the trial: it crashed, or ASHA stopped it at an epoch
                # report (Tune then ends the process, so the trial cannot close its run).
                error = crashed.get(sp["key"], "" if run_id else "the trial ended before it made its run")
                outcome = "failed" if error else "early_stopped"
                leftovers.append((sp, run_id, outcome, error))
            out.append((run_id, outcome, error))
            self.rows.append({"key": sp["key"], "command": sp["command"], "setting": sp["setting"], "rule": sp["rule"],
                              "policy": sp["config"]["policy"] if sp["command"] == "train" else "",
                              "run_id": run_id, "outcome": outcome, "error": error})
        if leftovers:  # closed in another process: here the parent is active, and MLflow starts no run beside it
            self.ray.get(self.ray.remote(num_cpus=0)(close_runs).remote(*zip(*leftovers)))
        return out

    @property
    def trials(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["key", "command", "setting", "rule", "policy", "run_id", "outcome",
                                                "error"])


def _progress(total: int):
    """Tune's per-trial printer (a result table each time) replaced by a line per ended trial."""
    from ray.tune.progress_reporter import TrialProgressCallback

    class Progress(TrialProgressCallback):
        def on_trial_result(self, *args, **kwargs):  # no table per result
            pass

        def on_trial_complete(self, iteration, trials, trial, **info):
            ended.append(trial)
            print(f"  [{len(ended)}/{total}] {trial.config['trial']['config']['run_name']} ended")

        on_trial_error = on_trial_complete

    ended = []
    return Progress()


def _tag(runs: pd.DataFrame, tag: str) -> pd.Series:
    return runs[f"tags.{tag}"].fillna("") if f"tags.{tag}" in runs else pd.Series("", index=runs.index)


def _children(experiment: str, parent: str) -> pd.DataFrame:
    from clr_mlflow.tracking.history import NoRuns, experiment_runs

    try:
        runs = experiment_runs(experiment)[1]
    except NoRuns:
        return pd.DataFrame(columns=["run_id", "status"])
    return runs[_tag(runs, PARENT) == parent].reset_index(drop=True)


def _log_comparison(experiment: str, experiment_id: str, parent: str, trials: pd.DataFrame):
    """compare_experiment's leaderboard and plots, of this sweep's runs only, into the parent."""
    from clr_mlflow.tracking import history
    from clr_mlflow.core import plots
    from clr_mlflow.tracking import runs as tracking
    from clr_mlflow.core.compare import leaderboard, verdict

    runs = _children(experiment, parent)
    kind = _tag(runs, "clr_mlflow.kind")
    trained, tested = runs[kind == "train"].reset_index(drop=True), list(runs.loc[kind == "range_test", "run_id"])
    names = dict(zip(runs["run_id"], _tag(runs, "mlflow.runName")))
    policy = dict(zip(trained["run_id"], trained.get("params.policy", pd.Series(dtype=str))))
    acc = {r: history.metric_series(r, METRIC) for r in trained["run_id"]}
    board, target = leaderboard(trained, acc)
    for at, (column, tag) in enumerate((("setting", SETTING), ("outcome", OUTCOME))):  # outcome: early_stopped too
        board.insert(2 + 2 * at, column, board["run_id"].map(dict(zip(trained["run_id"], _tag(trained, tag)))))
    tables = history.bounds_tables(experiment_id, tested)
    none = pd.DataFrame(columns=["step", "value", "run", "policy"])
    series = {k: pd.concat([history.metric_series(r, k).assign(run=r, policy=policy[r]) for r in policy] or [none])
              for k in (METRIC, "train/lr")}
    tracking.log_table(board, "compare/leaderboard.json")
    tracking.log_frame_csv(board, "compare/leaderboard.csv")
    tracking.log_frame_csv(trials, "sweep/trials.csv")
    tracking.log_figure(plots.compare_accuracy_figure(series[METRIC], names), "compare/accuracy.png")
    tracking.log_figure(plots.compare_lr_figure(series["train/lr"], names), "compare/lr.png")
    tracking.log_figure(plots.compare_range_tests_figure(
        {r: c for r in tested if (c := history.range_curve(r)) is not None},
        tables[tables["selected"].astype(bool)] if len(tables) else tables, names), "compare/range_tests.png")
    tracking.log_figure(plots.compare_bounds_figure(tables, names), "compare/bounds.png")
    return board, target, verdict(board, target)

