"""A user's own model and data through `clr-mlflow run` and `mlflow run`, as plug-ins
(`module.path:callable`) imported from the working directory or PYTHONPATH."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
CLR_MLFLOW = str(Path(sys.executable).parent / "clr-mlflow")  # the console script a user runs

NETS = """
from torch import nn


def build(num_classes, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, 32), nn.ReLU(),
                         nn.Linear(32, num_classes))


def not_a_model(num_classes, image_size):
    return "a string"
"""

DATA = """
import torch
from PIL import Image


class Brightness(torch.utils.data.Dataset):
    # dark or light 16x16 images: a two-class problem any model learns in a few steps
    classes = ("dark", "light")

    def __init__(self, n, seed, pil=False):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.rand(n, 3, 16, 16, generator=g) * 0.5 + self.y[:, None, None, None] * 0.5
        self.pil = pil

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.pil:
            x = Image.fromarray((x.permute(1, 2, 0) * 255).byte().numpy())
        return x, int(self.y[i])


def load():
    return Brightness(400, 0), Brightness(100, 1)


def load_pil():
    return Brightness(400, 0, pil=True), Brightness(100, 1, pil=True)


def broken():
    return 3
"""

ARGS = ["--image-size", "16", "--batch-size", "20", "--num-iters", "20", "--lr-start", "1e-4", "--lr-end", "1",
        "--iterations", "30", "--step-size", "10", "--device", "cpu", "--save-model", "false"]


@pytest.fixture
def user_project(tracking, tmp_path):
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(NETS))
    (pkg / "data.py").write_text(textwrap.dedent(DATA))
    MlflowClient().search_experiments()  # create the store once, before child processes open it
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    env.pop("MLFLOW_RUN_ID", None)
    return tmp_path, env


def history_len(run_id, key):
    return len(MlflowClient().get_metric_history(run_id, key))


def test_model_and_data_plugins_through_the_cli(user_project):
    cwd, env = user_project
    res = subprocess.run([CLR_MLFLOW, "run", "--model", "my_pkg.nets:build", "--data", "my_pkg.data:load", *ARGS,
                          "--experiment", "plug"], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["plug"])
    assert len(runs) == 1 and runs["status"][0] == "FINISHED"
    run = MlflowClient().get_run(runs["run_id"][0])
    p, m = run.data.params, run.data.metrics
    assert p["model"] == "my_pkg.nets:build" and p["data.source"] == "plugin:my_pkg.data:load"
    assert p["data.num_classes"] == "2" and p["data.train_size"] == "360" and p["data.image_shape"] == "3x16x16"
    n = history_len(run.info.run_id, "range_test/lr")
    assert 2 <= n <= 20 and n == m["range_test/iterations"]
    assert history_len(run.info.run_id, "train/lr") == 30 and history_len(run.info.run_id, "val/accuracy") == 2
    val = MlflowClient().get_metric_history(run.info.run_id, "val/accuracy")
    assert m["test/accuracy"] == max(val, key=lambda v: v.step).value and 0 <= m["test/accuracy"] <= 1


# Through the console script, in a user's project folder: one bad model and one bad data
# plug-in. Every other kind of bad plug-in is a row of tests/test_bad_inputs.py (in-process).
@pytest.mark.parametrize("args,needle", [
    (["--model", "my_pkg.nets:not_a_model"], "torch.nn.Module"),
    (["--data", "my_pkg.data:broken"], "(train, test) pair"),
])
def test_a_bad_plugin_is_one_line_before_any_run(user_project, args, needle):
    cwd, env = user_project
    full = ["--model", "my_pkg.nets:build", "--data", "my_pkg.data:load"] + args  # later options win
    res = subprocess.run([CLR_MLFLOW, "run", *full, *ARGS, "--experiment", "bad"], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("Error:") and needle in last
    assert mlflow.get_experiment_by_name("bad") is None


def test_plugins_through_mlflow_run(user_project):
    cwd, env = user_project
    params = {"model": "my_pkg.nets:build", "data": "my_pkg.data:load_pil", "image_size": 16, "batch_size": 20,
              "num_iters": 20, "lr_start": 1e-4, "lr_end": 1, "iterations": 30, "step_size": 10, "device": "cpu"}
    cmd = ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-name", "plugged"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, PYTHONPATH=str(cwd)), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["plugged"])
    assert len(runs) == 1 and runs["status"][0] == "FINISHED"
    run = MlflowClient().get_run(runs["run_id"][0])
    assert run.data.params["data.source"] == "plugin:my_pkg.data:load_pil"
    assert history_len(run.info.run_id, "train/lr") == 30 and "test/accuracy" in run.data.metrics
