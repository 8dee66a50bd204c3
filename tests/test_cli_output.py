"""What users see: the CLI's output, `mlflow run` of the compare entry point, and which code
`mlflow run` runs — on real tiny runs in a real SQLite store, through real subprocesses."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from clr_mlflow.app.config import Config
from clr_mlflow.app.runner import execute
from tests.conftest import REPO, use_store

SMALL = dict(limit_train=640, limit_test=64, batch_size=32, image_size=16, device="cpu")
PROGRESS = ("Downloading artifacts",)  # MLflow's tqdm bar (our own loops have bars of their own)


@pytest.fixture(scope="module")
def store(tmp_path_factory, cifar, data_dir):
    """Experiment `solo`: one range test; `cmp`: a range test and two trainings."""
    folder = tmp_path_factory.mktemp("cli_output")
    mp = pytest.MonkeyPatch()
    uri = use_store(mp, folder)
    base = dict(data=str(cifar), data_dir=str(data_dir), **SMALL)
    runs = {"solo": execute(Config(**base, experiment="solo", num_iters=12, lr_start=1e-4, lr_end=1.0), "range-test"),
            "range": execute(Config(**base, experiment="cmp", num_iters=12, lr_start=1e-4, lr_end=1.0), "range-test")}
    for policy in ("fixed", "triangular"):
        runs[policy] = execute(Config(**base, experiment="cmp", policy=policy, base_lr=0.02, max_lr=0.2, step_size=5,
                                      cycles=1, save_model=False), "train")
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        env.pop(var, None)
    # `mlflow run` starts `python -m clr_mlflow`: the python of this environment
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    yield dict(uri=uri, folder=folder, env=env, runs=runs, cifar=cifar, data_dir=data_dir)
    mp.undo()


def clr(store, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "clr_mlflow", *args], capture_output=True, text=True,
                          env=store["env"], cwd=cwd or store["folder"], timeout=600)


def mlflow_run(store, uri, entry, params, *extra):
    cmd = [sys.executable, "-m", "mlflow", "run", str(uri), "-e", entry, "--env-manager", "local", *extra]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=store["env"], cwd=store["folder"], timeout=900)


def store_path(store) -> str:
    return str(Path(store["folder"], "mlflow.db").resolve())


def test_compare_of_one_run_says_run_and_shows_no_progress_bars(store):
    res = clr(store, "compare", "--experiment", "solo", "--log-run", "false")
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"^read 1 run in \d+\.\d\ds$", res.stdout, re.M), res.stdout
    assert "1 runs" not in res.stdout
    assert not any(p in res.stdout + res.stderr for p in PROGRESS), res.stderr


def test_compare_leaderboard_output_and_where_to_look(store):
    runs = store["runs"]
    res = clr(store, "compare", "--experiment", "cmp", "--target-accuracy", "0.99")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert not any(p in out + res.stderr for p in PROGRESS), res.stderr
    assert "read 3 runs in" in out
    assert "NaN" not in out and "<NA>" not in out and "None" not in out
    ids = {r.run_id[:8] for r in runs.values()}
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in ids}
    for policy in ("fixed", "triangular"):
        row = rows[runs[policy].run_id[:8]]
        assert row.rstrip().split()[-3:-1] == ["not", "reached"]  # iters_to_target, then wall_seconds
        assert " 10 " in row and not re.search(r"\b10\.0\b", row)  # iterations, an integer
    assert "not reached" not in rows[runs["range"].run_id[:8]]
    compare_id = re.search(r"logged as run (\w+)", out).group(1)
    exp = mlflow.get_experiment_by_name("cmp")
    assert f"experiment 'cmp' (id {exp.experiment_id})" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{store_path(store)}" in out
    assert f"#/experiments/{exp.experiment_id}/runs/{compare_id}" in out
    csv = pd.read_csv(pd.io.common.StringIO(mlflow.artifacts.load_text(f"runs:/{compare_id}/compare/leaderboard.csv")),
                      dtype=str, keep_default_na=False).set_index("run_id")
    assert csv.loc[runs["fixed"].run_id, "iterations"] == "10" and csv.loc[runs["range"].run_id, "iterations"] == ""
    assert csv.loc[runs["fixed"].run_id, "iters_to_target"] == ""


def test_range_test_prints_where_to_look_before_its_summary(store):
    res = clr(store, "range-test", "--data", str(store["cifar"]), "--data-dir", str(store["data_dir"]),
              "--limit-train", "640", "--limit-test", "64", "--batch-size", "32",
              "--image-size", "16", "--device", "cpu",
              "--num-iters", "12", "--lr-start", "1e-4", "--lr-end", "1", "--experiment", "where")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    run_id = lines[-1].split()[1]  # the summary stays the last line: "run <id> | ..."
    exp = mlflow.get_experiment_by_name("where")
    assert MlflowClient().get_run(run_id).info.experiment_id == exp.experiment_id
    assert f"experiment 'where' (id {exp.experiment_id}), store sqlite:///{store_path(store)}" in lines
    (view,) = [line for line in lines if line.startswith("view: ")]
    assert view == (f"view: mlflow ui --backend-store-uri sqlite:///{store_path(store)}  then open "
                    f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run_id}")


def leaderboard_ids(run_id: str) -> list[str]:
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/compare/leaderboard.json")
    return [row[table["columns"].index("run_id")] for row in table["data"]]


def test_readme_compare_command_logs_into_the_named_experiment(store):
    runs = store["runs"]
    compared = sorted(runs[k].run_id for k in ("range", "fixed", "triangular"))
    before = set(mlflow.search_runs(experiment_names=["cmp"])["run_id"])

    # as the README writes it: no --experiment-name, so MLflow makes its run in Default
    res = mlflow_run(store, REPO, "compare", {"experiment": "cmp"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    default = mlflow.search_runs(experiment_names=["Default"])
    (made,) = default["run_id"]
    assert default["tags.clr_mlflow.kind"][0] == "compare"
    assert default["tags.mlflow.project.entryPoint"][0] == "compare"
    assert f"note: mlflow run made run {made} in experiment 'Default'" in res.stdout
    new = mlflow.search_runs(experiment_names=["cmp"])
    new = new[~new["run_id"].isin(before)]
    assert len(new) == 1 and new["tags.clr_mlflow.kind"].iloc[0] == "compare"
    first = new["run_id"].iloc[0]
    assert new["tags.clr_mlflow.launched_by"].iloc[0] == made
    assert sorted(leaderboard_ids(first)) == compared

    # with --experiment-name, the run MLflow made is the comparison; it never lists itself
    res = mlflow_run(store, REPO, "compare", {"experiment": "cmp"}, "--experiment-name", "cmp")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "note:" not in res.stdout
    later = mlflow.search_runs(experiment_names=["cmp"])
    later = later[~later["run_id"].isin(before | {first})]
    assert len(later) == 1
    second = later.iloc[0]
    assert second["tags.mlflow.project.entryPoint"] == "compare" and second["tags.clr_mlflow.kind"] == "compare"
    assert second["status"] == "FINISHED"
    assert sorted(leaderboard_ids(second["run_id"])) == compared
    assert len(mlflow.search_runs(experiment_names=["Default"])) == 1


def git(repo, *args) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, env=env).stdout.strip()


def set_version(repo: Path, suffix: str) -> None:
    (init,) = [f for f in (repo / "clr_mlflow" / "version.py", repo / "clr_mlflow" / "__init__.py")
               if f.is_file() and re.search(r'^__version__ = "', f.read_text(), re.M)]  # where it is set
    text, n = re.subn(r'__version__ = "([^"+]*)[^"]*"', rf'__version__ = "\1+{suffix}"', init.read_text())
    assert n == 1
    init.write_text(text)


def test_mlflow_run_of_a_commit_runs_the_code_of_that_commit(store, tmp_path):
    """The installed clr_mlflow (this checkout, editable) is not what `mlflow run -v` must run."""
    repo = tmp_path / "project"
    files = git(REPO, "ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    for name in files:
        src = REPO / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    git(repo, "init", "-q", "-b", "main")
    set_version(repo, "first")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    first = git(repo, "rev-parse", "HEAD")
    set_version(repo, "second")
    git(repo, "commit", "-q", "-am", "second")
    assert git(repo, "rev-parse", "HEAD") != first

    params = dict(data=store["cifar"], data_dir=store["data_dir"], num_iters=12, lr_start=1e-4, lr_end=1,
                  **{k: v for k, v in SMALL.items()})
    res = mlflow_run(store, f"file://{repo}", "range_test", params, "-v", first, "--experiment-name", "git")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (run_id,) = mlflow.search_runs(experiment_names=["git"])["run_id"]
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["mlflow.source.git.commit"] == first
    import clr_mlflow

    assert tags["clr_mlflow.version"] == clr_mlflow.__version__ + "+first"  # not the installed code, not HEAD
    assert tags["clr_mlflow.git_commit"] == tags["mlflow.source.git.commit"]


def test_mlflow_run_params_with_awkward_values_reproduce_exactly(store, tmp_path):
    weird = tmp_path / "my images" / "bob's \\data"
    weird.parent.mkdir()
    weird.symlink_to(store["cifar"], target_is_directory=True)
    params = dict(data=weird, data_dir=store["data_dir"], num_iters=12, lr_start=1e-4, lr_end=1, augment="off",
                  nesterov="t", **SMALL)
    res = mlflow_run(store, REPO, "range_test", params, "--experiment-name", "awkward")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (run_id,) = mlflow.search_runs(experiment_names=["awkward"])["run_id"]
    logged = MlflowClient().get_run(run_id).data.params
    # what MLflow logs for `mlflow run -P k=v`: the shell-quoted value it put in the command
    assert logged["data"] == shlex.quote(str(weird)) and logged["augment"] == "off" and logged["nesterov"] == "t"
    assert logged["run_name"] == "''"

    res = clr(store, "reproduce", run_id)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "range-test curve identical (12 iterations)" in res.stdout
    assert not any(p in res.stdout + res.stderr for p in PROGRESS), res.stderr
    rep_id = re.search(r"reproduction: run (\w+)", res.stdout).group(1)
    rep = MlflowClient().get_run(rep_id).data
    assert (rep.params["data"], rep.params["augment"], rep.params["nesterov"]) == (str(weird), "False", "True")
    assert rep.params["data.digest"] == logged["data.digest"]
    original_name = MlflowClient().get_run(run_id).data.tags["mlflow.runName"]
    assert rep.tags["mlflow.runName"] == f"{original_name} (reproduction)"
