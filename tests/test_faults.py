"""Faults as they happen to a user's process: real signals to a real `clr-mlflow` subprocess,
a rejected input inside `mlflow run`, runs started together; read back from a real store."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from clr_mlflow.app.cli import main
from clr_mlflow.core import checkpoint
from clr_mlflow.tracking import spool
from tests.conftest import empty_store_file
from tests.servers import forked_clis

REPO = Path(__file__).resolve().parents[1]
CLR_MLFLOW = str(Path(sys.executable).parent / "clr-mlflow")


@pytest.fixture
def store_env(tracking):
    MlflowClient().search_experiments()  # the schema exists before any child opens the file
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    env.pop("MLFLOW_RUN_ID", None)
    return env


def steps_of(run_id, key):
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def wait_for(condition, what, proc, timeout=300):
    """Poll `condition` until it holds (its value), while `proc` lives; the timeout only
    trips on a hang."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        assert proc.poll() is None, f"exited before {what}:\n" + proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def run_of(experiment):
    exp = mlflow.get_experiment_by_name(experiment)
    runs = mlflow.search_runs([exp.experiment_id]) if exp is not None else []
    return runs["run_id"][0] if len(runs) else None


def a_checkpoint(run_id):
    """The run's train/checkpoint.pt as it is now, loaded; None while it has none (or while
    the store is still copying it in)."""
    if "train/checkpoint.pt" not in [a.path for a in MlflowClient().list_artifacts(run_id, "train")]:
        return None
    try:
        return checkpoint.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="train/checkpoint.pt"))
    except (checkpoint.CheckpointError, OSError):
        return None


def wait_for_training(proc, experiment, timeout=300):
    """The run id once training is under way: its first checkpoint (an epoch, or
    --checkpoint-every iterations, in) is in the store. An event, not a time: the process
    is signalled mid-training however fast this machine trains."""
    run_id = wait_for(lambda: run_of(experiment), f"a run in {experiment!r}", proc, timeout)
    wait_for(lambda: a_checkpoint(run_id), f"the first checkpoint of run {run_id}", proc, timeout)
    return run_id


# 360 training images in batches of 32: 11 iterations an epoch, a checkpoint at each epoch's end;
# 300 iterations are 27 epochs and 7.5 triangular2 cycles (the SIGKILL test's checkpoint comes at 50).
ITERATIONS = 300
# The signal tests: 160 iterations are 15 epochs and 4 triangular2 cycles, so the signal (at the
# first checkpoint, iteration 11) falls early in training and resume continues through cycles and epochs.
SIGNALLED = 160
RESUMABLE = ["run", "--limit-train", "400", "--limit-test", "64", "--batch-size", "32", "--num-iters", "60",
             "--lr-start", "1e-4", "--bounds-rule", "loss_edge", "--policy", "triangular2", "--step-size", "20",
             "--iterations", str(SIGNALLED), "--device", "cpu", "--system-metrics", "false"]


def history(run_id, key, client=None):
    client = client or MlflowClient()
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory, cifar, data_dir):
    """The same run as the signal test's, never stopped, in a store of its own (module scope:
    one more signal's case reuses it)."""
    folder = tmp_path_factory.mktemp("whole")
    shutil.copyfile(empty_store_file(), folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    res = subprocess.run([CLR_MLFLOW, *RESUMABLE, "--data", str(cifar), "--data-dir", str(data_dir), "--experiment",
                          "whole"], env=env, cwd=folder, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    client = MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name("whole").experiment_id])[0].info.run_id
    return client, run_id, uri


# SIGTERM here (what `kill`, Kubernetes and torchrun send); Ctrl-C's path to the same KILLED run,
# checkpoint and "continue it with" line is test_a_signal_repeated_at_once_... (exit 130).
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143)])
def test_a_signal_mid_training_ends_the_run_killed_and_resume_ends_it_as_if_never_stopped(store_env, cifar, data_dir,
                                                                                         never_stopped, signum, code):
    args = [*RESUMABLE, "--data", str(cifar), "--data-dir", str(data_dir)]
    env = dict(store_env, OMP_NUM_THREADS="1")  # one torch thread: OpenMP spinning on a shared core crawls
    proc = subprocess.Popen([CLR_MLFLOW, *args, "--experiment", "cut"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_id = wait_for_training(proc, "cut")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert f"Interrupted by {signal.Signals(signum).name}: run {run_id} is marked KILLED" in err
    assert f"continue it with: clr-mlflow resume {run_id}" in err
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED"
    n = run.data.metrics["range_test/iterations"]
    assert steps_of(run_id, "range_test/lr") == list(range(int(n)))  # the finished range test, whole
    trained = steps_of(run_id, "train/lr")
    assert 0 < len(trained) < SIGNALLED and trained == list(range(len(trained)))  # every iteration done, no gap
    assert steps_of(run_id, "train/loss") == trained
    assert [a.path for a in MlflowClient().list_artifacts(run_id, "train")] == ["train/checkpoint.pt"]

    res = subprocess.run([CLR_MLFLOW, "resume", run_id], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].startswith(f"run {run_id} |")
    reference, whole, reference_uri = never_stopped
    resumed = MlflowClient().get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert steps_of(run_id, "train/lr") == list(range(SIGNALLED))  # each step once
    for key in ("train/lr", "train/loss", "train/smoothed_loss", "val/accuracy", "val/loss", "train/epoch_accuracy"):
        assert history(run_id, key) == history(whole, key, reference), key  # bit for bit on the CPU
    finals = reference.get_run(whole).data.metrics
    for key in ("test/accuracy", "test/loss", "val/best_accuracy", "train/loss"):
        assert resumed.data.metrics[key] == finals[key], key
    a = mlflow.pytorch.load_model(f"runs:/{run_id}/model").state_dict()
    mlflow.set_tracking_uri(reference_uri)  # the model is a logged model of the run's store
    try:
        b = mlflow.pytorch.load_model(f"runs:/{whole}/model").state_dict()
    finally:
        mlflow.set_tracking_uri(store_env["MLFLOW_TRACKING_URI"])
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigkill_after_a_checkpoint_then_resume_leaves_no_step_missing_or_twice(store_env, cifar, data_dir):
    """The hard case: killed between a checkpoint and the next buffer flush, the process can
    only leave the spool; resume sends it, then trains on from the checkpoint."""
    args = ["train", "--data", str(cifar), "--data-dir", str(data_dir), "--limit-train", "400", "--limit-test", "64",
            "--batch-size", "32", "--base-lr", "0.01", "--max-lr", "0.1", "--iterations", str(ITERATIONS),
            "--step-size", "20", "--checkpoint-every", "50", "--device", "cpu", "--system-metrics", "false",
            "--save-model", "false", "--experiment", "sigkill"]
    proc = subprocess.Popen([CLR_MLFLOW, *args], env=store_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # Killed as soon as the first checkpoint (iteration 50) is whole in the store: past a
    # checkpoint, well before the next one and before the buffer's next 5-s flush.
    run_id = wait_for_training(proc, "sigkill")
    proc.kill()
    proc.communicate(timeout=60)
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # nobody could say otherwise
    # Whenever the kill fell, the spool holds the series up to the last checkpoint.
    journal = [spool.decode_metrics(e) for e in spool.read_journal(spool.find(run_id)) if e["op"] == "metrics"]
    spooled = max(int(d["train/lr"][0].max()) for d in journal if "train/lr" in d)
    at = checkpoint.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="train/checkpoint.pt"))
    assert spooled >= at["loop"]["t"] - 1
    res = subprocess.run([CLR_MLFLOW, "resume", run_id], capture_output=True, text=True, env=store_env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"run {run_id}: " in res.stdout  # the spool's line: sent before training went on
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    for key in ("train/lr", "train/loss"):
        assert steps_of(run_id, key) == list(range(ITERATIONS)), key
    epochs = steps_of(run_id, "val/accuracy")
    assert len(epochs) == len(set(epochs)) == ITERATIONS // 11 + 1


def test_a_signal_repeated_at_once_is_one_stop_and_the_checkpoint_is_written(store_env, cifar, data_dir):
    """`mlflow run` and torchrun deliver one Ctrl-C twice (the terminal's, then their own
    SIGTERM): the repeat must not cut the checkpoint short."""
    args = ["train", "--data", str(cifar), "--data-dir", str(data_dir), "--limit-train", "400", "--limit-test", "64",
            "--batch-size", "32", "--base-lr", "0.01", "--max-lr", "0.1", "--iterations", "3000", "--step-size", "100",
            "--device", "cpu", "--system-metrics", "false", "--save-model", "false", "--experiment", "twice"]
    proc = subprocess.Popen([CLR_MLFLOW, *args], env=store_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run_id = wait_for_training(proc, "twice")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"continue it with: clr-mlflow resume {run_id}" in err
    assert MlflowClient().get_run(run_id).info.status == "KILLED"


def test_resume_refuses_a_finished_run_and_a_run_without_checkpoint_in_one_line(store_env):
    client = MlflowClient()
    exp = client.create_experiment("refused")
    finished = client.create_run(exp, tags={"clr_mlflow.command": "train"})
    client.set_terminated(finished.info.run_id, "FINISHED")
    bare = client.create_run(exp, tags={"clr_mlflow.command": "train"})
    client.set_terminated(bare.info.run_id, "KILLED")
    tested = client.create_run(exp, tags={"clr_mlflow.command": "range-test"})
    for k, (run_id, needle) in enumerate(((finished.info.run_id, "is FINISHED: nothing to resume"),
                                          (bare.info.run_id, "to have a checkpoint (train/checkpoint.pt), but it has none"),
                                          (tested.info.run_id, "to name a training run of clr_mlflow"),
                                          ("0" * 32, "to name an existing run"))):
        if k == 0:  # through a real `clr-mlflow` process, as a user runs it
            res = subprocess.run([CLR_MLFLOW, "resume", run_id], capture_output=True, text=True, env=store_env,
                                 timeout=300)
            code, stderr = res.returncode, res.stderr
        else:  # the same command in this process (click's CliRunner): no interpreter to start
            res = CliRunner().invoke(main, ["resume", run_id])
            code, stderr = res.exit_code, res.stderr
            assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        last = stderr.strip().splitlines()[-1]
        assert code == 2 and last.startswith("Error: Expected") and needle in last, stderr[-1500:]
    assert client.get_run(bare.info.run_id).info.status == "KILLED"  # refused before the run was touched


# A rejected input inside `mlflow run`: tests/test_faults2.py (one line, no traceback, the run FAILED).


def test_unnamed_runs_with_the_same_seed_get_different_names_and_training_records_system_metrics(
        store_env, cifar, data_dir):
    # system metrics sampled every 0.2 s below: a few samples in a short run
    args = ["train", "--data", str(cifar), "--data-dir", str(data_dir), "--limit-train", "400", "--limit-test", "64",
            "--batch-size", "32", "--image-size", "16",
            "--base-lr", "0.01", "--max-lr", "0.1", "--iterations", "60", "--step-size", "10",
            "--device", "cpu", "--experiment", "names", "--save-model", "false"]
    for _ in range(2):  # in-process (CliRunner): what is checked is the runs, not a process
        res = CliRunner().invoke(main, args, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"})
        assert res.exit_code == 0, res.output[-2000:]
    runs = mlflow.search_runs(experiment_names=["names"])
    assert len(runs) == 2 and runs["tags.mlflow.runName"].nunique() == 2
    system = [k for k in MlflowClient().get_run(runs["run_id"][0]).data.metrics if k.startswith("system/")]
    assert any("cpu" in k for k in system) and any("memory" in k for k in system)
    assert np.all(runs["status"] == "FINISHED")


def test_three_processes_on_a_fresh_sqlite_file_all_finish(tmp_path, cifar, data_dir):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"  # no schema yet: every process finds it missing
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    args = ["train", "--data", str(cifar), "--data-dir", str(data_dir), "--limit-train", "400", "--limit-test", "64",
            "--batch-size", "32", "--image-size", "16",
            "--base-lr", "0.01", "--max-lr", "0.1", "--iterations", "4", "--step-size", "2",
            "--device", "cpu", "--experiment", "together", "--save-model", "false", "--system-metrics", "false"]
    # forked after the imports, before any of them opens the store
    logs = [tmp_path / f"seed{k}.log" for k in range(3)]
    codes = forked_clis([(log, [*args, "--seed", str(k)]) for k, log in enumerate(logs)], env, tmp_path, 600)
    assert [codes[str(log)] for log in logs] == [0] * 3, [log.read_text()[-1500:] for log in logs]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["together"])
    assert len(runs) == 3 and set(runs["status"]) == {"FINISHED"}


# One case of each command through a real `clr-mlflow` process; the others through click's
# CliRunner (tests/test_bad_inputs.py does every command so).
THROUGH_A_PROCESS = [["range-test", "--num-iters", "1000000000000"],
                     ["train", "--base-lr", "0.01", "--max-lr", "0.1", "--iterations", "1000000000000"],
                     ["compare", "--target-accuracy", "nan"]]


@pytest.mark.parametrize("args,needle", [
    (["range-test", "--num-iters", "1000000000000"], "Expected num_iters <= 10,000,000"),
    (["range-test", "--lr-end", "inf"], "Expected finite lr_end"),
    (["range-test", "--lr-end", "1e300"], "Expected lr_end <= 1,000,000"),
    (["range-test", "--bounds-divisor", "inf"], "Expected finite bounds_divisor"),
    (["range-test", "--diverge", "nan"], "Expected finite diverge"),
    (["range-test", "--experiment", ""], "non-empty name for experiment"),
    (["train", "--base-lr", "0.01", "--max-lr", "0.1", "--iterations", "1000000000000"],
     "Expected iterations <= 1,000,000,000"),
    (["train", "--base-lr", "0.01", "--max-lr", "0.1", "--step-epochs", "inf"], "Expected finite step_epochs"),
    (["train", "--base-lr", "0.01", "--max-lr", "0.1", "--step-epochs", "1e300"], "Expected step_epochs <= 1,000,000"),
    (["train", "--base-lr", "0.01", "--max-lr", "0.1", "--checkpoint-every", "-2"], "checkpoint_every"),
    (["compare", "--target-accuracy", "nan"], "target-accuracy"),
])
def test_absurd_numbers_and_names_are_one_line_before_any_run(store_env, tmp_path, args, needle):
    data_dir = [] if args[0] == "compare" else ["--data-dir", str(tmp_path)]
    if args in THROUGH_A_PROCESS:  # the console script, as a user runs it
        res = subprocess.run([CLR_MLFLOW, *args, *data_dir], capture_output=True, text=True, env=store_env,
                             timeout=300)
        code, stderr = res.returncode, res.stderr
    else:  # the same click group in this process: the same checks, without an interpreter's start
        res = CliRunner().invoke(main, args + data_dir)
        code, stderr = res.exit_code, res.stderr
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and "Error:" in last and needle in last, stderr[-1500:]
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_a_deleted_experiment_or_a_silent_server_is_one_line_within_seconds(store_env, tmp_path):
    exp = mlflow.create_experiment("gone")
    mlflow.delete_experiment(exp)
    res = subprocess.run([CLR_MLFLOW, "range-test", "--data-dir", str(tmp_path), "--experiment", "gone"],
                         capture_output=True, text=True, env=store_env, timeout=300)
    assert res.returncode == 2 and "'gone' is deleted" in res.stderr.strip().splitlines()[-1]
    started = time.time()
    silent = dict(store_env, MLFLOW_TRACKING_URI="http://127.0.0.1:9")  # nothing listens on the discard port
    res = subprocess.run([CLR_MLFLOW, "range-test", "--data-dir", str(tmp_path)], capture_output=True, text=True,
                         env=silent, timeout=300)
    assert res.returncode == 2 and "did not answer within 10 s" in res.stderr.strip().splitlines()[-1]
    assert time.time() - started < 60


def cifar10_server_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("www.cs.toronto.edu", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(cifar10_server_reachable(), reason="online: torchvision would download CIFAR-10")
def test_cifar10_offline_is_one_line_before_any_run(store_env, tmp_path):
    res = subprocess.run([CLR_MLFLOW, "range-test", "--data", "cifar10", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, env=store_env, timeout=300)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and last.startswith("Error: Expected data=cifar10 to download"), res.stderr[-1500:]
    assert "Traceback" not in res.stderr
    assert mlflow.search_runs(search_all_experiments=True).empty
