"""`clr-mlflow sweep`: real Ray Tune sweeps (a local Ray started by the sweep) on CIFAR-10
images into a real SQLite store, read back with MlflowClient."""
import importlib.util
import os
import subprocess
import sys
from dataclasses import replace

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from clr_mlflow.app.config import Config, ConfigError
from clr_mlflow.app.cli import sweep_cmd
from clr_mlflow.app.ray_cluster import INSTALL, RAY_ENV
from clr_mlflow.app.sweep import parse_grid, sweep

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='needs pip install "clr_mlflow[sweep]"')


@pytest.fixture
def base(cifar, data_dir, tracking):
    # 360 training images (10% held out) in batches of 32: 11 iterations an epoch
    return Config(data=str(cifar), data_dir=str(data_dir), limit_train=400, limit_test=100, batch_size=32,
                  num_iters=30, lr_start=1e-4, lr_end=1.0, step_size=2, cycles=1, save_model=False,
                  system_metrics=False, device="cpu", experiment="sw")


def sweep_runs(experiment):
    runs = mlflow.search_runs(experiment_names=[experiment])
    parent = runs[runs["tags.clr_mlflow.kind"] == "sweep"]
    assert len(parent) == 1
    return parent.iloc[0], runs[runs["tags.clr_mlflow.kind"] != "sweep"]


@needs_ray
def test_two_seeds_two_rules_under_one_parent(base):
    # One policy: the policy axis is a plain product (test_project's sweep script trains two)
    ours = {name: os.environ.get(name) for name in RAY_ENV}
    result = sweep(base, {}, ["triangular"], ["min_div10", "loss_edge"], [0, 1])
    assert {name: os.environ.get(name) for name in RAY_ENV} == ours  # set for the sweep's duration only
    parent, children = sweep_runs("sw")
    assert parent["run_id"] == result.run_id and parent["status"] == "FINISHED"
    assert parent["params.policies"] == "triangular" and parent["params.seeds"] == "0,1"
    assert parent["params.bounds_rules"] == "min_div10,loss_edge" and parent["params.grid"] == ""
    assert (children["tags.mlflow.parentRunId"] == result.run_id).all()
    assert (children["status"] == "FINISHED").all() and (children["tags.clr_mlflow.sweep.outcome"] == "finished").all()

    tests = children[children["tags.clr_mlflow.kind"] == "range_test"]
    assert sorted(tests["params.seed"]) == ["0", "1"]  # one range test per seed, whatever the rule or policy
    range_of = dict(zip(tests["params.seed"], tests["run_id"]))
    tables = MlflowClient().load_table(parent["experiment_id"], "range_test/bounds.json", run_ids=list(tests["run_id"]),
                                       extra_columns=["run_id"])

    trained = children[children["tags.clr_mlflow.kind"] == "train"]
    assert sorted(zip(trained["params.seed"], trained["tags.bounds_rule"], trained["params.policy"])) == sorted(
        (s, r, "triangular") for s in "01" for r in ("min_div10", "loss_edge"))
    for _, run in trained.iterrows():
        range_id = range_of[run["params.seed"]]
        row = tables[(tables["run_id"] == range_id) & (tables["rule"] == run["tags.bounds_rule"])].iloc[0]
        if run["tags.bounds_rule"] == "min_div10":  # the rule the range test chose: bounds_from
            assert run["params.bounds_from"] == range_id and run["params.bounds_source"] == f"run:{range_id}"
        else:  # another rule's row of the same table, passed explicitly
            assert run["params.bounds_source"] == f"run:{range_id} rule:loss_edge"
        assert run["metrics.bounds/max_lr"] == pytest.approx(row["max_lr"])
        assert run["metrics.test/accuracy"] >= 0

    board = mlflow.load_table("compare/leaderboard.json", run_ids=[result.run_id])
    assert sorted(board["run_id"]) == sorted(trained["run_id"]) and len(result.board) == 4
    arts = {a.path for a in MlflowClient().list_artifacts(result.run_id, "compare")}
    assert {"compare/accuracy.png", "compare/lr.png", "compare/range_tests.png", "compare/bounds.png"} <= arts
    assert "2 range tests: 2 finished" in result.summary() and "4 trainings: 4 finished" in result.summary()
    assert parent["metrics.sweep/finished"] == 6 and parent["tags.compare.verdict"].startswith("best:")


@needs_ray
def test_failed_and_early_stopped_trials_are_recorded_and_the_sweep_goes_on(base):
    # Known bounds (no range tests). fixed trains at base_lr: 0.05 learns, 1e-7 does not;
    # triangular reaches max_lr=1e6 every 2 iterations and diverges. One trial at a time, in order, so
    # ASHA has seen base_lr=0.05's first epoch (val acc 0.25) when base_lr=1e-7's (0.1) comes.
    cfg = replace(base, max_lr=1e6, iterations=33, experiment="sw_fail")
    result = sweep(cfg, {"base_lr": ["0.05", 1e-7]}, ["fixed", "triangular"], ["min_div10"], [0],
                   max_concurrent=1, early_stop=True)
    parent, children = sweep_runs("sw_fail")
    assert (children["tags.mlflow.parentRunId"] == result.run_id).all()
    assert set(children["tags.clr_mlflow.kind"]) == {"train"} and len(children) == 4
    outcome = {(r["params.base_lr"], r["params.policy"]): (r["status"], r["tags.clr_mlflow.sweep.outcome"])
               for _, r in children.iterrows()}
    assert outcome == {("0.05", "fixed"): ("FINISHED", "finished"),
                       ("1e-07", "fixed"): ("FINISHED", "early_stopped"),
                       ("0.05", "triangular"): ("FAILED", "failed"),
                       ("1e-07", "triangular"): ("FAILED", "failed")}
    failed = children[children["status"] == "FAILED"]
    assert failed["tags.clr_mlflow.error"].str.startswith("TrainingDiverged: training loss is not finite").all()
    stopped = children[children["tags.clr_mlflow.sweep.outcome"] == "early_stopped"].iloc[0]
    # epoch 1 is reported as epoch 2 ends (a report is an epoch late, so a stop never cuts the test evaluation)
    assert len(MlflowClient().get_metric_history(stopped["run_id"], "val/accuracy")) == 2
    assert "metrics.test/accuracy" not in stopped or stopped.isna()["metrics.test/accuracy"]
    assert [result.count(o) for o in ("finished", "failed", "early_stopped")] == [1, 2, 1]
    assert "4 trainings: 1 finished, 2 failed, 1 early stopped" in result.summary()
    assert parent["status"] == "FINISHED" and parent["metrics.sweep/failed"] == 2


def test_grid_values_are_typed_and_bad_input_stops_before_any_run(base):
    assert parse_grid(["lr_end=1,10", "cycles=1;augment=false", "data=a,b"]) == {
        "lr_end": [1.0, 10.0], "cycles": [1], "augment": [False], "data": ["a", "b"]}
    with pytest.raises(ConfigError, match="--policies"):
        parse_grid(["policy=fixed"])
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_grid(["cycles"])
    with pytest.raises(ConfigError, match="Expected param cycles to be an integer"):
        parse_grid(["cycles=two"])
    with pytest.raises(ConfigError, match=r"seed=0 batch_size=0 policy=fixed: Expected positive integer batch_size"):
        sweep(base, {"batch_size": [32, 0]}, ["fixed"], ["min_div10"], [0])
    res = CliRunner().invoke(sweep_cmd, ["--grid", "nope=1"])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith("Error: Expected --grid keys")
    assert CliRunner().invoke(sweep_cmd, ["--policy", "fixed"]).exit_code == 2  # --policies replaces it
    assert mlflow.search_experiments(filter_string="name = 'sw'") == []


def test_without_ray_one_line_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['ray'] = None  # `import ray` now fails as if it were not installed\n"
            "from clr_mlflow.app.cli import sweep_cmd\n"
            "sweep_cmd(['--policies', 'fixed'], prog_name='clr-mlflow sweep')\n")
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines == [f"Error: Expected Ray Tune for sweeps, but it is not installed: {INSTALL}"]
    assert INSTALL == 'pip install "clr_mlflow[sweep]"' and not (tmp_path / "mlflow.db").exists()
