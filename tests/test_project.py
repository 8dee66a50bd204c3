"""The project as a user runs it: MLproject entry points, `mlflow run`, the CLI's errors."""
import os
import subprocess
import sys
import typing
from dataclasses import fields

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from clr_mlflow.app.cli import main, option_name
from clr_mlflow.app.config import COMMANDS, ENTRY_POINTS, Config
from tests.conftest import REPO


def mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


@pytest.mark.parametrize("entry,command", ENTRY_POINTS.items())
def test_every_declared_parameter_reaches_the_command_and_matches_the_cli(entry, command):
    ep = mlproject()["entry_points"][entry]
    names = Config.names(COMMANDS[command])
    assert list(ep["parameters"]) == names
    assert ep["command"].startswith(f"python -m clr_mlflow {command} ")
    for name in names:
        assert f"{option_name(name)} {{{name}}}" in ep["command"], name
    hints = typing.get_type_hints(Config)
    defaults = {f.name: f.default for f in fields(Config)}
    for name, spec in ep["parameters"].items():
        assert spec["type"] == {int: "int", float: "float"}.get(hints[name], "string"), name
        assert str(spec["default"]).lower() == str(defaults[name]).lower() or float(spec["default"]) == defaults[name]


def test_conda_env_lists_the_package_dependencies():
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    for dep in ("mlflow", "torch", "torchvision", "pandas", "seaborn", "tqdm"):
        assert any(p.startswith(dep) for p in pip_deps), dep


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "clr_mlflow.app.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture
def store_env(tracking, tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    env.pop("MLFLOW_RUN_ID", None)
    # create the database once, before any child process opens it
    MlflowClient().search_experiments()
    return env


@pytest.mark.parametrize("args,needle", [
    (["--num-iters", "1"], "num_iters"),
    (["--lr-start", "0"], "lr_start"),
    (["--lr-end", "1e-6"], "lr_end"),
    (["--sweep", "cosine"], "sweep"),
    (["--bounds-rule", "accuracy"], "eval_every"),
    (["--data", "/nowhere"], "does not exist"),
])
def test_cli_bad_input_is_one_line_before_any_run(store_env, tmp_path, args, needle):
    if args == ["--num-iters", "1"]:  # one through a real process, as a user runs it
        res = cli("range-test", "--data-dir", str(tmp_path), *args, env=store_env)
        code, stderr = res.returncode, res.stderr
    else:  # the others through the same click group in this process (no interpreter to start)
        res = CliRunner().invoke(main, ["range-test", "--data-dir", str(tmp_path), *args])
        code, stderr = res.exit_code, res.stderr
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert code == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Error:") and needle in last
    assert mlflow.get_experiment_by_name("clr_mlflow") is None


def test_cli_rejects_a_non_integer_for_an_int_option(store_env):
    res = cli("train", "--batch-size", "12.5", env=store_env)
    assert res.returncode == 2 and "batch-size" in res.stderr


def mlflow_run(entry, params, env):
    cmd = ["mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local", "--experiment-name", "e2e"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.parametrize("entry", ["range_test", "main"])
def test_mlflow_run_end_to_end(store_env, cifar, data_dir, entry):
    small = dict(data=cifar, data_dir=data_dir, limit_train=512, limit_test=100, batch_size=32, image_size=16,
                 num_iters=40, lr_start=1e-4, lr_end=10, device="cpu")
    if entry == "main":
        small |= dict(step_size=4, cycles=1, policy="triangular2", bounds_rule="min_div10")
    res = mlflow_run(entry, small, store_env)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["e2e"])
    assert len(runs) == 1 and runs["status"][0] == "FINISHED"
    run = MlflowClient().get_run(runs["run_id"][0])
    assert run.data.tags["mlflow.project.entryPoint"] == entry
    assert run.data.params["limit_train"] == "512"
    lr = MlflowClient().get_metric_history(run.info.run_id, "range_test/lr")
    assert len(lr) >= 10 and {"bounds/base_lr", "bounds/max_lr"} <= set(run.data.metrics)
    if entry == "main":
        assert len(MlflowClient().get_metric_history(run.info.run_id, "train/lr")) == 8
        assert run.data.params["bounds_source"] == "range_test" and run.data.tags["policy"] == "triangular2"
        assert "test/accuracy" in run.data.metrics


def test_docs_document_every_parameter_and_readme_starts_with_the_quickstart():
    table = (REPO / "docs" / "guides" / "cli.md").read_text()  # generated: tests/test_docs.py
    for f in fields(Config):
        assert f"| `{f.name}` |" in table, f.name
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(quick) == 2 and "mlflow run ." in quick[0] and "pytest" in quick[1]


def test_mlproject_is_what_the_generator_writes():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_mlproject.py"), "--check"], cwd=REPO)
    assert res.returncode == 0, "MLproject is out of date: run python scripts/gen_mlproject.py"


def test_sweep_script_trains_every_policy_and_compares(store_env, cifar, data_dir):
    # Two policies: the script's pass-through is the point (test_sweep trains every policy's kind)
    env = dict(store_env, EXPERIMENT="sweep", JOBS="2", POLICIES="triangular2 one_cycle",
               TRAIN_ARGS="-P step_size=2 -P cycles=1 -P save_model=false")
    args = ["-P", f"data={cifar}", "-P", f"data_dir={data_dir}", "-P", "limit_train=400", "-P", "limit_test=100",
            "-P", "batch_size=32", "-P", "device=cpu"]
    env["RANGE_ARGS"] = "-P num_iters=30 -P lr_start=1e-4 -P lr_end=1 -P bounds_rule=loss_edge"
    res = subprocess.run(["bash", str(REPO / "scripts" / "sweep_policies.sh"), *args], capture_output=True, text=True,
                         env=dict(env, EXPERIMENT="sweep2"), timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["sweep2"])
    kinds = runs["tags.clr_mlflow.kind"].value_counts().to_dict()
    assert kinds == {"sweep": 1, "range_test": 1, "train": 2}
    trained = runs[runs["tags.clr_mlflow.kind"] == "train"]
    assert sorted(trained["params.policy"]) == ["one_cycle", "triangular2"]
    range_id = runs.loc[runs["tags.clr_mlflow.kind"] == "range_test", "run_id"].iloc[0]
    assert set(trained["params.bounds_source"]) == {f"run:{range_id}"}
    assert "best:" in res.stdout


def test_cli_range_test_then_reproduce_and_compare(store_env, cifar, data_dir):
    args = ["--data", str(cifar), "--data-dir", str(data_dir), "--limit-train", "400", "--limit-test", "64",
            "--batch-size", "32", "--image-size", "16",
            "--num-iters", "12", "--lr-start", "1e-4", "--lr-end", "1", "--experiment", "cli"]
    first = cli("range-test", *args, env=store_env)
    assert first.returncode == 0, first.stderr[-2000:]
    run_id = first.stdout.strip().splitlines()[-1].split()[1]
    again = cli("reproduce", run_id, env=store_env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "range-test curve identical (12 iterations)" in again.stdout
    assert f"clr_mlflow.reproduces={run_id}" in again.stdout
    board = CliRunner().invoke(main, ["compare", "--experiment", "cli", "--log-run", "false"])  # reading: in-process
    assert board.exit_code == 0 and "read 2 runs" in board.stdout
    assert CliRunner().invoke(main, ["reproduce", "0" * 32]).exit_code == 2
    missing = cli("compare", "--experiment", "nope", env=store_env)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("Error:")
