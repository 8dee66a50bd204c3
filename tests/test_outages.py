"""Tracking outages as they happen to a user: a real `mlflow server` SIGKILLed mid-training
(back on the same port once the run's writer has found it gone, or not before the run has
ended), a `clr-mlflow` process SIGKILLed. What the run wrote is in its spool and reaches MLflow once, in order:
by the writer's retries, or later by `clr-mlflow sync`."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from servers import cli_in_process, shared_sqlite_server, up_again

from clr_mlflow.tracking import delivery
from clr_mlflow.tracking import spool
from clr_mlflow.tracking import sync as spool_sync
from clr_mlflow.tracking.iteration_logger import IterationLogger
from clr_mlflow.tracking.runs import active_run, log_artifact_file, log_metrics, log_params, set_tags, undelivered

CLR_MLFLOW = str(Path(sys.executable).parent / "clr-mlflow")


def train_args(cifar, data_dir, iterations, experiment, checkpoint_every):
    # 16-px images: ~9 ms an iteration here (32 px: ~35 ms), what the outages need is wall time
    return ["train", "--data", str(cifar), "--data-dir", str(data_dir), "--limit-train", "400", "--limit-test", "64",
            "--batch-size", "32", "--image-size", "16", "--base-lr", "0.01", "--max-lr", "0.1", "--iterations", str(iterations),
            "--step-size", "50", "--device", "cpu", "--experiment", experiment, "--system-metrics", "false",
            "--checkpoint-every", str(checkpoint_every)]  # a few checkpoints: ops during training too


FLUSH_SECONDS = "0.5"  # a training sends its values this often: it finds a store gone within seconds


def child_env(uri, spool_root):
    # The bounded HTTP retries the CLI sets (tracking.bounded_http_retries), named here so
    # the test does not depend on which entry point sets them. Values are flushed every
    # FLUSH_SECONDS (not every 5 s): an outage is noticed, and a training's first values
    # arrive, within seconds, so the trainings can be short. One torch thread: two spin
    # against each other on two busy cores (a training ran 25x slower than with one).
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, CLR_MLFLOW_SPOOL_DIR=str(spool_root), **delivery.HTTP_RETRY_LIMITS,
               CLR_MLFLOW_FLUSH_SECONDS=FLUSH_SECONDS, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def start(args, env, logs: Path):
    # Output goes to files: a pipe nobody reads would stall the child on the progress bar.
    out, err = open(logs / "stdout", "w"), open(logs / "stderr", "w")
    return subprocess.Popen([CLR_MLFLOW, *args], env=env, stdout=out, stderr=err, cwd=logs)


def steps_of(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def wait_for_training(proc, client, logs, experiment, min_steps=1, timeout=300):
    """The run id once `min_steps` train/lr values are in the store."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, (logs / "stderr").read_text()[-3000:]
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and len(steps_of(client, runs[0].info.run_id, "train/lr")) >= min_steps:
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError("training never started")


def wait_until(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)


def journal_steps(folder, key):
    """The steps of `key` in a spool's journal, in journal order."""
    return [int(s) for e in spool.read_journal(folder) if e["op"] == "metrics"
            for k, (steps, _, _) in spool.decode_metrics(e).items() if k == key for s in steps]


def assert_whole_run(client, run_id, iterations, status="FINISHED"):
    run = client.get_run(run_id)
    assert run.info.status == status
    for key in ("train/lr", "train/loss"):
        assert steps_of(client, run_id, key) == list(range(iterations)), key  # every step, each once
    train = {a.path for a in client.list_artifacts(run_id, "train")}
    assert {"train/curve.csv", "train/epochs.csv", "train/curves.png", "train/schedule.png",
            "train/checkpoint.pt"} <= train
    models = [client.get_logged_model(o.model_id) for o in run.outputs.model_outputs]
    assert [m.name for m in models] == ["model"] and str(models[0].status).endswith("READY")
    assert run.data.params["iterations"] == str(iterations) and "mlflow.note.content" in run.data.tags
    assert "test/accuracy" in run.data.metrics


@pytest.fixture
def server(request):
    """The test process's `mlflow server` on SQLite (servers.shared_sqlite_server, shared with
    test_full_disk.py; each test in experiments of its own), which a test may crash and
    restart; up again for the next test."""
    shared = shared_sqlite_server(request.config)
    yield shared
    up_again(shared)  # crashed and left down by the test


def test_a_server_killed_mid_training_and_back_later_loses_no_point(server, tmp_path, cifar, data_dir):
    # ~18 s of training on a quiet machine here: it must outlast the writer's first try after
    # the crash (the next flush, FLUSH_SECONDS later, then MLflow's bounded retries: ~4 s,
    # mostly the retries' backoff, which a slower machine does not stretch), ~600 iterations.
    iterations = 2000
    client = MlflowClient(server.uri)
    proc = start(train_args(cifar, data_dir, iterations, "back", checkpoint_every=500),
                 child_env(server.uri, tmp_path / "spool"), tmp_path)
    run_id = wait_for_training(proc, client, tmp_path, "back")
    server.crash()
    # The outage lasts until the run's writer has found the store gone (its next flush
    # fails), whenever that is; the process is held still (SIGSTOP) while the server
    # restarts, so however long a restart takes here, training goes on after it.
    wait_until(lambda: "did not take a write" in (tmp_path / "stderr").read_text() or proc.poll() is not None,
               "the writer finds the store away", timeout=300)
    proc.send_signal(signal.SIGSTOP)
    try:
        assert proc.poll() is None, (f"training ({iterations} iterations) ended before its writer found the store "
                                     "away: it needs more iterations on this machine\n"
                                     + (tmp_path / "stderr").read_text()[-3000:])
        server.restart()
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=600) == 0, (tmp_path / "stderr").read_text()[-3000:]
    err = (tmp_path / "stderr").read_text()
    assert "did not take a write" in err and "answers again" in err  # the outage did hit the writer
    assert_whole_run(client, run_id, iterations)
    assert not (tmp_path / "spool").exists()  # all delivered: the spool went


def test_a_server_killed_for_good_the_run_ends_locally_and_sync_delivers_everything(server, tmp_path, cifar,
                                                                                    data_dir):
    # The crash comes once the first values are stored (FLUSH_SECONDS into training, ~60
    # iterations here): the training, its test and its end go on long after it.
    iterations = 1200
    client = MlflowClient(server.uri)
    proc = start(train_args(cifar, data_dir, iterations, "for_good", checkpoint_every=300),
                 child_env(server.uri, tmp_path / "spool"), tmp_path)
    run_id = wait_for_training(proc, client, tmp_path, "for_good")
    server.crash()
    code = proc.wait(timeout=600)
    ended = time.time()
    err = (tmp_path / "stderr").read_text()
    found = re.search(r"`clr-mlflow sync (\S+)`", err)
    assert found, ("nothing was left to sync: did the training end before the crash?\n" + err[-3000:])
    folder = Path(found.group(1))
    assert folder == tmp_path / "spool" / run_id
    last_chunk = max(int(ts.max()) for e in spool.read_journal(folder) if e["op"] == "metrics"
                     for key, (_, _, ts) in spool.decode_metrics(e).items() if key == "train/lr")
    assert ended - last_chunk / 1000 < 60  # ended within seconds of its last iteration, not minutes
    assert journal_steps(folder, "train/lr")[-1] == iterations - 1

    # `clr-mlflow sync` after the fact: in this process (its own process is not the point)
    res = cli_in_process(["sync", folder], child_env(server.uri, tmp_path / "spool"))
    assert res.exit_code == 1 and "Error: Expected a tracking server" in res.stderr  # still down: refused
    server.restart()
    res = cli_in_process(["sync", folder], child_env(server.uri, tmp_path / "spool"))
    assert res.exit_code == 0, res.stderr[-3000:]
    assert f"run {run_id}: " in res.stdout and "status FINISHED delivered" in res.stdout
    assert_whole_run(client, run_id, iterations)
    assert not folder.exists()
    assert code == 0, err[-3000:]  # last: what it spooled is checked above whatever the CLI did after


def test_sigkill_mid_training_keeps_all_but_the_last_seconds_and_sync_ends_the_run_killed(tracking, tmp_path,
                                                                                        cifar, data_dir,
                                                                                        monkeypatch):
    client, root = MlflowClient(), tmp_path / "spool"
    monkeypatch.setenv("CLR_MLFLOW_SPOOL_DIR", str(root))
    client.search_experiments()  # the schema exists before the child opens the file
    # 3000 iterations: far more than run before the kill (it comes once 200 are stored)
    proc = start(train_args(cifar, data_dir, 3000, "killed", checkpoint_every=500), child_env(tracking, root), tmp_path)
    run_id = wait_for_training(proc, client, tmp_path, "killed", min_steps=200)
    proc.send_signal(signal.SIGKILL)  # mid-training: values since the last flush exist in no store
    proc.wait(timeout=60)
    folder = spool.find(run_id)
    assert folder == root / run_id
    stored, spooled = steps_of(client, run_id, "train/lr"), journal_steps(folder, "train/lr")
    assert spooled == list(range(len(spooled))) and set(stored) <= set(spooled)  # in order, from 0, a superset
    assert client.get_run(run_id).info.status == "RUNNING"

    env = child_env(tracking, root)  # `clr-mlflow sync` after the fact: in this process
    res = cli_in_process(["sync", folder], env)
    assert res.exit_code == 0, res.stderr[-3000:]
    assert res.stdout.startswith(f"run {run_id}: ") and "status KILLED delivered" in res.stdout
    assert steps_of(client, run_id, "train/lr") == spooled and steps_of(client, run_id, "train/loss") == spooled
    assert client.get_run(run_id).info.status == "KILLED" and not folder.exists()
    again = cli_in_process(["sync", folder], env)
    assert again.exit_code != 0 and again.stdout == ""  # nothing left to send: refused, nothing sent


# The journal, unit by unit ------------------------------------------------------------

WRITER = """
import os, sys
import numpy as np
from clr_mlflow.tracking import spool
sp = spool.acquire(sys.argv[1], sys.argv[2])
for start in range(0, 40, 8):
    steps = np.arange(start, start + 8)
    sp.append_metrics([(1_700_000_000_000 + start, steps, {"x/lr": steps * 0.5, "x/loss": np.full(8, np.nan)})])
sp.journal_op("params", {"params": {"p": "1"}}, None)
print(sp.dir, flush=True)
if sys.argv[3] == "hold":
    sys.stdin.read()  # holds the spool's lock until the test closes stdin
os._exit(0)  # no clean-up: the spool stays as a killed process leaves it
"""


def write_spool(run_id, uri, env, hold=False):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, run_id, uri, "hold" if hold else "exit"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


@pytest.fixture
def spool_env(tracking, tmp_path, monkeypatch):
    monkeypatch.setenv("CLR_MLFLOW_SPOOL_DIR", str(tmp_path / "spool"))
    return dict(os.environ)


def test_a_torn_last_line_is_skipped_and_a_second_sync_sends_nothing_twice(tracking, spool_env, tmp_path):
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        mlflow.log_metric("x/lr", 0.0, step=0)  # already in the store: not sent again
    mlflow.MlflowClient().update_run(run_id, "RUNNING")  # as a killed writer leaves it
    proc, folder = write_spool(run_id, tracking, spool_env)
    proc.wait(timeout=60)
    with open(folder / spool.JOURNAL, "ab") as f:
        f.write(b'{"op":"metrics","keys":{"x/lr":{"steps":"AAAA')  # SIGKILL in the middle of a line
    copy = shutil.copytree(folder, tmp_path / "copy" / run_id)
    assert len(spool.read_journal(folder)) == 6

    assert spool_sync.sync(folder) == f"run {run_id}: 79 metric values, 0 artifacts, status KILLED delivered to {tracking}"
    assert spool_sync.sync(copy) == f"run {run_id}: 0 metric values, 0 artifacts, status KILLED delivered to {tracking}"
    history = MlflowClient().get_metric_history(run_id, "x/lr")
    assert sorted(m.step for m in history) == list(range(40))
    assert [m.value for m in sorted(history, key=lambda m: m.step)][1:] == [s * 0.5 for s in range(1, 40)]
    nan = MlflowClient().get_metric_history(run_id, "x/loss")
    assert len(nan) == 40 and all(np.isnan(m.value) for m in nan)
    assert MlflowClient().get_run(run_id).data.params == {"p": "1"}
    assert not folder.exists() and not (tmp_path / "copy").exists()  # sent: the folders (and emptied root) go


def test_sync_refuses_in_one_line_what_it_cannot_send(tracking, spool_env, tmp_path):
    with pytest.raises(spool.SyncError, match="Expected a clr_mlflow spool folder"):
        spool_sync.sync(tmp_path)
    with mlflow.start_run() as run:
        pass
    proc, folder = write_spool(run.info.run_id, tracking, spool_env, hold=True)
    try:
        with pytest.raises(spool.SyncError, match=f"in use by a live process \\(pid {proc.pid}\\)"):
            spool_sync.sync(folder)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    with pytest.raises(spool.SyncError, match="Expected a tracking server at http://127.0.0.1:9, but it did not "
                                              "answer within 10 s"):
        spool_sync.sync(folder, tracking_uri="http://127.0.0.1:9")  # nothing listens on the discard port
    (folder / spool.JOURNAL).write_bytes(b'{"op":"params","params":{}}\nnot json\n{"op":"params","params":{}}\n')
    with pytest.raises(spool.SyncError, match="line 2 is not a journal entry"):
        spool_sync.sync(folder)
    assert spool.find(run.info.run_id) == folder  # refused: the spool stays


@pytest.fixture
def in_process(server, tmp_path, monkeypatch):
    """This test process logs to `server` as the CLI would (bounded HTTP retries, its own
    spool folder, no experiment left active by an earlier test); yields a client of it."""
    monkeypatch.setenv("CLR_MLFLOW_SPOOL_DIR", str(tmp_path / "spool"))
    for name, value in {**delivery.HTTP_RETRY_LIMITS, "MLFLOW_TRACKING_URI": server.uri}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(server.uri)
    try:
        yield MlflowClient(server.uri)
    finally:
        mlflow.set_tracking_uri(None)


def test_the_run_ends_at_once_when_the_store_is_away_and_this_process_can_send_its_spool_later(server, in_process,
                                                                                              tmp_path):
    client = in_process
    with active_run("away") as run:
        # close_timeout: long enough for the writer's first try to fail (about 2.5 s)
        with IterationLogger(close_timeout=5) as log:
            log.series(np.arange(50), {"x/lr": np.arange(50) * 0.1})
            log.flush()
            while len(steps_of(client, run.info.run_id, "x/lr")) < 50:
                time.sleep(0.1)
            server.crash()
            log.series(np.arange(50, 100), {"x/lr": np.arange(50, 100) * 0.1})
        started = time.monotonic()
        log_params({"p": 1})
        log_metrics({"test/accuracy": 0.5})
        set_tags({"t": "v"})
    assert time.monotonic() - started < 5  # the store is known away: journaled at once, no retries
    assert mlflow.active_run() is None  # the run left the fluent stack though the store never heard
    folder = undelivered(run.info.run_id)
    assert folder == tmp_path / "spool" / run.info.run_id
    with pytest.raises(spool.SyncError, match="did not answer"):
        spool_sync.sync(folder)
    server.restart()
    assert spool_sync.sync(folder).endswith(f"status FINISHED delivered to {server.uri}")
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.params == {"p": "1"} and got.data.tags["t"] == "v"
    assert got.data.metrics["test/accuracy"] == 0.5
    assert steps_of(client, run.info.run_id, "x/lr") == list(range(100))
    assert undelivered(run.info.run_id) is None and not folder.exists()


def test_ops_spooled_in_a_short_outage_are_sent_when_the_store_answers_again_the_newest_file_only(
        server, in_process, tmp_path):
    client = in_process
    checkpoint = tmp_path / "checkpoint.txt"
    with active_run("short") as run, IterationLogger() as log:
        run_id = run.info.run_id
        server.crash()
        log.series(np.arange(10), {"x/lr": np.arange(10) * 0.1})
        log.flush()
        wait_until(lambda: spool.get(run_id).away, "the writer finds the store away")
        for version in ("old", "new"):  # a checkpoint an epoch, while the store is away
            checkpoint.write_text(version)
            log_artifact_file(checkpoint, "train")
        waiting = spool.get(run_id).waiting
        assert [e["path"] for e in waiting] == ["train/checkpoint.txt"]  # the newer one replaced the older
        staged = sorted(p.name for p in (spool.get(run_id).dir / "files").iterdir())
        assert staged == [Path(waiting[0]["files"]).name]  # and the older file is gone
        server.restart()
        wait_until(lambda: not spool.get(run_id).away, "the writer gets through again")
        set_tags({"after": "outage"})  # the next op sends what waited first
        assert spool.get(run_id).waiting == []
        assert client.get_run(run_id).data.tags["after"] == "outage"
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="train/checkpoint.txt",
                                                dst_path=str(tmp_path / "down"))
    assert Path(local).read_text() == "new"
    assert client.get_run(run_id).info.status == "FINISHED" and steps_of(client, run_id, "x/lr") == list(range(10))
    assert undelivered(run_id) is None and not (tmp_path / "spool").exists()


def test_a_logger_closing_in_an_outage_warns_only_about_its_own_values(server, in_process, capsys):
    """Two loggers on one run (the range test's and training's): the one whose values all
    arrived closes without a warning while the other's chunk still waits for the store."""
    client = in_process
    with active_run("two loggers") as run, IterationLogger(close_timeout=60) as waiting:  # a restart, a backoff
        run_id = run.info.run_id
        with IterationLogger(close_timeout=1) as done:
            done.series(np.arange(20), {"done/lr": np.arange(20) * 0.1})
            done.flush()
            wait_until(lambda: len(steps_of(client, run_id, "done/lr")) == 20 and not done.unsent,
                       "the first logger's values stored and acknowledged")
            server.crash()
            waiting.series(np.arange(30), {"waits/lr": np.arange(30) * 0.1})
            waiting.flush()
            wait_until(lambda: spool.get(run_id).away, "the writer finds the store away")
        assert "has not taken every value" not in capsys.readouterr().err
        server.restart()
    assert "has not taken every value" not in capsys.readouterr().err  # back in time: all taken
    assert client.get_run(run_id).info.status == "FINISHED"
    assert steps_of(client, run_id, "waits/lr") == list(range(30))
    assert steps_of(client, run_id, "done/lr") == list(range(20))
    assert undelivered(run_id) is None
