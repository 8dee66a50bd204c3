"""A shared tracking server: the `clr-mlflow` CLI, run as a user runs it, logging over HTTP
into a real `mlflow server` on a real PostgreSQL 15, alone and eight at once; everything is
read back through the server with MlflowClient."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.servers import LookupBarrier, cli_in_process, forked_clis, mlflow_server, pg_server  # noqa: F401  (fixtures)

CLI_TIMEOUT = 600


def clr_command() -> list[str]:
    """The installed console script next to this interpreter (as a user runs it)."""
    script = Path(sys.executable).with_name("clr-mlflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clr_mlflow.app.cli"]


def user_env(uri: str) -> dict[str, str]:
    """The environment of a user whose MLFLOW_TRACKING_URI points at the shared server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def clr(args, uri: str, cwd: Path) -> str:
    """Run one clr-mlflow command to the end; fail with its output unless it exits 0."""
    out = subprocess.run(clr_command() + [str(a) for a in args], cwd=cwd, env=user_env(uri), capture_output=True,
                         text=True, timeout=CLI_TIMEOUT)
    assert out.returncode == 0, f"clr-mlflow {args[0]} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


def clr_here(args, uri: str) -> str:
    """`clr` in this process (servers.cli_in_process), for the commands whose own process is
    not the point (compare, reproduce): the same user environment, without a second of imports."""
    import torch

    env = {k: None for k in os.environ if k.startswith("MLFLOW_")} | {"MLFLOW_TRACKING_URI": uri}
    threads = torch.get_num_threads()
    torch.set_num_threads(int(user_env(uri)["OMP_NUM_THREADS"]))  # the same arithmetic as the `run` process
    try:
        res = cli_in_process([str(a) for a in args], env)
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, f"clr-mlflow {args[0]} exited {res.exit_code}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res.stdout


def history(client: MlflowClient, run_id: str, key: str):
    h = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return np.array([m.step for m in h]), np.array([m.value for m in h])


def download(client: MlflowClient, run_id: str, path: str, dst: Path) -> bytes:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst))).read_bytes()


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} is not on the server"
    return client.search_runs([exp.experiment_id], max_results=1000)


def server_inventory(client: MlflowClient) -> list[tuple]:
    """Every run on the server, deleted ones too: (experiment, run id, name, status), for failure messages."""
    from mlflow.entities import ViewType

    return [(e.name, r.info.run_id, r.info.run_name, r.info.status)
            for e in client.search_experiments(view_type=ViewType.ALL)
            for r in client.search_runs([e.experiment_id], run_view_type=ViewType.ALL, max_results=1000)]


@pytest.fixture(scope="module")
def client(mlflow_server):  # noqa: F811
    return MlflowClient(tracking_uri=mlflow_server)


def test_server_is_http_on_postgres(mlflow_server, pg_server):  # noqa: F811
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", mlflow_server)
    assert pg_server.startswith("postgresql+") and "@127.0.0.1:" in pg_server


def test_run_compare_reproduce_through_the_server(mlflow_server, client, cifar, data_dir, tmp_path):  # noqa: F811
    iterations = 40
    out = clr(["run", "--data", cifar, "--data-dir", data_dir, "--limit-train", 1000, "--limit-test", 200,
               "--num-iters", 30, "--iterations", iterations, "--step-size", 10, "--model", "small_cnn",
               "--batch-size", 64, "--image-size", 16, "--device", "cpu", "--seed", 0, "--experiment", "team"],
              mlflow_server, tmp_path)
    runs = runs_of(client, "team")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    run_id = run.info.run_id
    assert f"run {run_id}" in out
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied by the server
    m = run.data.metrics

    # every iteration of both phases arrived over HTTP
    n_range = int(m["range_test/iterations"])
    assert 10 <= n_range <= 30
    steps, lrs = history(client, run_id, "range_test/lr")
    np.testing.assert_array_equal(steps, np.arange(n_range))
    assert np.all(np.diff(lrs) > 0)
    for key in ("range_test/loss", "range_test/smoothed_loss"):
        assert len(history(client, run_id, key)[0]) == n_range, key
    assert run.data.params["total_iters"] == str(iterations)
    steps, lrs = history(client, run_id, "train/lr")
    np.testing.assert_array_equal(steps, np.arange(iterations))
    assert lrs.min() == pytest.approx(m["bounds/base_lr"]) and lrs.max() <= m["bounds/max_lr"] * (1 + 1e-9)
    assert len(history(client, run_id, "train/loss")[0]) == iterations
    assert 0 <= m["test/accuracy"] <= 1

    # artifacts come back through the server's artifact proxy
    dst = tmp_path / "download"
    png = download(client, run_id, "range_test/curve.png", dst)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    table = json.loads(download(client, run_id, "range_test/bounds.json", dst))
    table = pd.DataFrame(table["data"], columns=table["columns"])
    assert len(table) >= 4 and table["rule"].is_unique
    chosen = table[table["selected"]]
    assert len(chosen) == 1 and chosen["max_lr"].iloc[0] == pytest.approx(m["bounds/max_lr"])
    curve = pd.read_csv(io.BytesIO(download(client, run_id, "train/curve.csv", dst)))
    assert len(curve) == iterations
    np.testing.assert_allclose(curve["lr"], lrs, rtol=1e-12)
    range_curve = pd.read_csv(io.BytesIO(download(client, run_id, "range_test/curve.csv", dst)))
    assert len(range_curve) == n_range

    # compare reads the experiment back from the server and logs its run there
    out = clr_here(["compare", "--experiment", "team"], mlflow_server)
    assert run_id[:8] in out
    compare_runs = [r for r in runs_of(client, "team") if r.data.tags.get("clr_mlflow.kind") == "compare"]
    assert len(compare_runs) == 1 and compare_runs[0].info.status == "FINISHED"
    board = json.loads(download(client, compare_runs[0].info.run_id, "compare/leaderboard.json", dst / "cmp"))
    assert len(board["data"]) == 1

    # reproduce: same params, new run in the same experiment, tagged with the original
    out = clr_here(["reproduce", run_id], mlflow_server)
    again = [r for r in runs_of(client, "team") if r.data.tags.get("clr_mlflow.reproduces") == run_id]
    assert len(again) == 1, out
    new = again[0]
    assert f"reproduction: run {new.info.run_id}" in out
    assert new.info.status == "FINISHED" and new.info.experiment_id == run.info.experiment_id
    same = lambda params: {k: v for k, v in params.items() if k != "run_name"}  # noqa: E731
    assert same(new.data.params) == same(run.data.params)
    assert new.data.metrics["range_test/iterations"] == n_range
    np.testing.assert_array_equal(history(client, new.info.run_id, "train/lr")[0], np.arange(iterations))
    np.testing.assert_array_equal(history(client, new.info.run_id, "range_test/lr")[1],
                                  history(client, run_id, "range_test/lr")[1])


def test_eight_range_tests_at_once_lose_no_point(mlflow_server, client, cifar, data_dir, tmp_path):  # noqa: F811
    n, num_iters = 8, 40
    jobs = []
    for seed in range(n):
        args = ["range-test", "--data", cifar, "--data-dir", data_dir, "--limit-train", 400, "--limit-test", 50,
                "--model", "small_cnn", "--batch-size", 32, "--image-size", 16,
                "--num-iters", num_iters, "--lr-start", 1e-4, "--lr-end", 1.0, "--diverge", 1e9, "--device", "cpu",
                "--seed", seed,
                "--experiment", "swarm", "--run-name", f"seed{seed}"]
        jobs.append((str(tmp_path / f"seed{seed}.log"), [str(a) for a in args]))
    # eight processes at once, each its own MLflow client (forked after the imports)
    codes = forked_clis(jobs, user_env(mlflow_server), tmp_path, CLI_TIMEOUT)
    for seed in range(n):
        rc = codes[str(tmp_path / f"seed{seed}.log")]
        assert rc == 0, f"seed {seed} exited {rc}:\n{(tmp_path / f'seed{seed}.log').read_text()[-5000:]}"

    # each process names its run; look each one up by id, then check the experiment's listing
    runs = []
    for seed in range(n):
        found = re.search(r"\brun ([0-9a-f]{32})\b", (tmp_path / f"seed{seed}.log").read_text())
        assert found, f"seed {seed} printed no run id:\n{(tmp_path / f'seed{seed}.log').read_text()[-3000:]}"
        runs.append(client.get_run(found.group(1)))
    listed = {r.info.run_id: r.info.run_name for r in runs_of(client, "swarm")}
    assert sorted(listed) == sorted(r.info.run_id for r in runs), (listed, server_inventory(client))
    for seed, r in enumerate(runs):
        assert r.info.run_name == f"seed{seed}" and r.info.experiment_id == runs[0].info.experiment_id
        assert r.info.status == "FINISHED", r.info.run_name
        assert r.data.params["seed"] == str(seed)
        assert r.data.metrics["range_test/iterations"] == num_iters, r.info.run_name
        for key in ("range_test/lr", "range_test/loss", "range_test/smoothed_loss"):
            steps, _ = history(client, r.info.run_id, key)
            np.testing.assert_array_equal(steps, np.arange(num_iters), err_msg=f"{r.info.run_name} {key}")
    # same schedule everywhere, different data order: the losses differ between seeds
    lrs = [history(client, r.info.run_id, "range_test/lr")[1] for r in runs]
    for other in lrs[1:]:
        np.testing.assert_array_equal(other, lrs[0])
    losses = {tuple(history(client, r.info.run_id, "range_test/loss")[1]) for r in runs}
    assert len(losses) == n


def test_processes_creating_one_new_experiment_at_once_all_land_in_it(mlflow_server, client, tmp_path):  # noqa: F811
    """Three processes look the new experiment up together (a proxy holds the lookups until
    all three have asked), find nothing and all create it: the two that lose must still log
    into it. MLflow's set_experiment returned to a loser without making the experiment
    active, so its run landed in Default (seen once in CI with eight range tests at once)."""
    n = 3
    # n processes, forked after importing (seconds of CPU each) from one that prints their exit codes last
    child = ("import os, sys, traceback\n"
             "from clr_mlflow.tracking import runs as tracking\n"
             "pids = []\n"
             f"for _ in range({n}):\n"
             "    pid = os.fork()\n"
             "    if pid == 0:\n"
             "        code = 1\n"
             "        try:\n"
             "            with tracking.active_run('raced') as run:\n"
             "                print('landed', run.info.experiment_id, run.info.run_id, flush=True)\n"
             "            code = 0\n"
             "        except BaseException:\n"
             "            traceback.print_exc()\n"
             "        finally:\n"
             "            sys.stderr.flush()\n"
             "            os._exit(code)\n"
             "    pids.append(pid)\n"
             "print('codes', *[os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids], flush=True)\n")
    with LookupBarrier(mlflow_server, n) as proxy:
        # MLflow's "View run" lines, written by three processes into one pipe, must not split a "landed" line
        env = {**user_env(proxy.uri), "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
        forker = subprocess.Popen([sys.executable, "-c", child], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = forker.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(forker.pid, signal.SIGKILL)  # one that hung must not outlive the test
            raise
    assert forker.returncode == 0 and f"\ncodes {' '.join(['0'] * n)}\n" in "\n" + out, (out, err[-4000:])
    experiment = client.get_experiment_by_name("raced")
    landed = [m.groups() for m in re.finditer(r"landed (\d+) ([0-9a-f]{32})", out)]
    assert len(landed) == n, (out, err[-4000:])
    assert [e for e, _ in landed] == [experiment.experiment_id] * n, (experiment.experiment_id, landed)
    assert {r.info.run_id for r in runs_of(client, "raced")} == {r for _, r in landed}
