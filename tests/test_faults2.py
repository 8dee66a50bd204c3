"""Faults, round two: run ids that are patterns, code a stored run names, checkpoints that do
not fit, sweeps that cannot run, a store that is not there, a rejected input inside
`mlflow run`, two resumes of one run. Real `clr-mlflow` processes, a real store, real signals;
every wait is for an event in the store or a process."""
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from clr_mlflow.core import checkpoint
from clr_mlflow.tracking import lease
from tests.conftest import empty_store_file
from tests.servers import cli_in_process, free_port

REPO = Path(__file__).resolve().parents[1]
CLR_MLFLOW = str(Path(sys.executable).parent / "clr-mlflow")
HEX = "0123456789abcdef" * 2


def clean_env(uri: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_TRACKING_URI": uri}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def clr(*args, env, cwd=None, timeout=300, program=(CLR_MLFLOW,)):
    return subprocess.run([*program, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def in_process(*args, env) -> subprocess.CompletedProcess:
    """`clr-mlflow ARGS` in this process (servers.cli_in_process) as a CompletedProcess, for
    refusals, where a process is not the point."""
    res = cli_in_process(args, env)
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


def one_line_error(res, code=2) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code and lines and lines[-1].startswith("Error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    return lines[-1]


@pytest.fixture
def store(tracking):
    MlflowClient().search_experiments()  # the schema exists before any child opens the file
    return tracking


# 1. Run ids ---------------------------------------------------------------------------------

def test_a_run_id_that_is_a_pattern_is_one_line_and_no_spool_folder_is_touched(store, tmp_path):
    spool = tmp_path / "spool"
    for name in (HEX, f"{HEX}.4242"):  # another run's folders, as a killed process leaves them
        (spool / name).mkdir(parents=True)
        (spool / name / "run.json").write_text('{"run_id": "%s", "tracking_uri": "%s"}' % (HEX, store))
        (spool / name / "journal.jsonl").write_text("")
    before = sorted((p.relative_to(spool), p.stat().st_mtime_ns) for p in spool.rglob("*"))
    env = clean_env(store, CLR_MLFLOW_SPOOL_DIR=str(spool))
    for args, name in ((["resume", "*"], "RUN_ID"), (["resume", "?" * 32], "RUN_ID"),
                       (["reproduce", HEX.upper()], "RUN_ID"), (["train", "--bounds-from", "*", "--data-dir", str(tmp_path)], "bounds_from")):
        line = one_line_error(in_process(*args, env=env))
        assert line.startswith(f"Error: Expected {name} to be a run id of 32 lowercase hex characters, but got "), line
    assert sorted((p.relative_to(spool), p.stat().st_mtime_ns) for p in spool.rglob("*")) == before
    assert mlflow.search_runs(search_all_experiments=True).empty


# 2. Code named by a run ----------------------------------------------------------------------

def test_reproduce_and_resume_import_no_plugin_a_run_names_without_consent_nor_from_the_working_directory(
        store, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "imported"
    (work / "evilplug.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef build(n, s):\n    raise SystemExit\n")
    client = MlflowClient()
    exp = client.create_experiment("plugged")
    run = client.create_run(exp, tags={"clr_mlflow.command": "train"}).info.run_id
    client.log_param(run, "model", "evilplug:build")
    client.set_terminated(run, "KILLED")
    env = clean_env(store)
    for command in ("reproduce", "resume"):
        line = one_line_error(clr(command, run, env=env, cwd=work))
        assert "--allow-plugins" in line and "model=evilplug:build (module evilplug)" in line, line
    # Consent given, under `python -m` (which puts the working directory first on sys.path):
    # the module is still not imported from there.
    line = one_line_error(clr("reproduce", "--allow-plugins", run, env=env, cwd=work,
                              program=(sys.executable, "-m", "clr_mlflow")))
    assert "importing evilplug failed: ModuleNotFoundError" in line, line
    assert not marker.exists()
    assert client.get_run(run).info.status == "KILLED"
    assert len(mlflow.search_runs([exp])) == 1


# 3. Checkpoints validated before anything changes, and 7. the lease --------------------------

@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, cifar):
    """A training run stopped by SIGTERM after its first checkpoint: (store URI, run id, the
    checkpoint as loaded). Its iterations are many: a resume of it runs until stopped."""
    folder = tmp_path_factory.mktemp("killed")
    shutil.copyfile(empty_store_file(), folder / "mlflow.db")  # schema made: this process never races the child's
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = clean_env(uri, CLR_MLFLOW_SPOOL_DIR=str(folder / "spool"))
    args = ["train", "--data", str(cifar), "--data-dir", str(folder / "data"), "--limit-train", "400",
            "--limit-test", "64", "--batch-size", "32", "--base-lr", "0.01", "--max-lr", "0.1",
            "--iterations", "100000", "--step-size", "100", "--checkpoint-every", "10", "--device", "cpu",
            "--system-metrics", "false", "--save-model", "false", "--experiment", "killed"]
    proc = subprocess.Popen([CLR_MLFLOW, *args], env=env, cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    mlflow.set_tracking_uri(uri)
    try:
        run_id = wait_for(lambda: _checkpointed(proc), "a checkpoint", 600)
        proc.send_signal(signal.SIGTERM)
        assert proc.communicate(timeout=300)[0] is not None and proc.returncode == 143
        client = MlflowClient()
        assert client.get_run(run_id).info.status == "KILLED"
        path = client.download_artifacts(run_id, "train/checkpoint.pt", str(folder))
        yield uri, run_id, checkpoint.load(path), folder
    finally:
        if proc.poll() is None:
            proc.kill()
        mlflow.set_tracking_uri(None)


def wait_for(probe, what, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"never saw {what}")


def _checkpointed(proc):
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    exp = mlflow.get_experiment_by_name("killed")
    runs = mlflow.search_runs([exp.experiment_id]) if exp else []
    if len(runs):
        run_id = runs["run_id"][0]
        if [a.path for a in MlflowClient().list_artifacts(run_id, "train")] == ["train/checkpoint.pt"]:
            return run_id
    return None


def upload(run_id, state, folder):
    path = folder / "upload" / checkpoint.FILE
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)
    MlflowClient().log_artifact(run_id, str(path), checkpoint.ARTIFACT_DIR)


def bad_states(state):
    def without_loop(s):
        del s["loop"]

    def t(value):
        def change(s):
            s["loop"]["t"] = value
        return change

    def wrong_shape(s):
        key = next(iter(s["steps"]["model"]))
        s["steps"]["model"][key] = torch.zeros(*(n + 1 for n in s["steps"]["model"][key].shape))
        return key

    return [(without_loop, "state to have 'loop', but it is missing"),
            (t(-5), "loop.t to be a non-negative integer, but got -5"),
            (t("7"), "loop.t to be a non-negative integer, but got '7'"),
            (wrong_shape, "to have shape (")]


def test_a_checkpoint_that_does_not_fit_is_one_line_and_the_run_stays_killed(killed_run):
    import copy

    uri, run_id, state, folder = killed_run
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    steps = len(client.get_metric_history(run_id, "train/lr"))
    try:
        for change, needle in bad_states(state):
            bad = copy.deepcopy(state)
            change(bad)
            upload(run_id, bad, folder)
            line = one_line_error(in_process("resume", run_id, env={"MLFLOW_TRACKING_URI": uri}))
            assert line.startswith(f"Error: Expected run {run_id}'s train/checkpoint.pt's ") and needle in line, line
            run = client.get_run(run_id)
            assert run.info.status == "KILLED" and len(client.get_metric_history(run_id, "train/lr")) == steps
            assert not [k for k in run.data.params if k.startswith(lease.PARAM)]  # not even a lease taken
    finally:
        upload(run_id, state, folder)
        mlflow.set_tracking_uri(None)


def test_a_second_resume_of_a_run_being_resumed_is_refused_and_writes_nothing(killed_run):
    uri, run_id, _, folder = killed_run
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    env = clean_env(uri, CLR_MLFLOW_SPOOL_DIR=str(folder / "spool"))
    first = subprocess.Popen([CLR_MLFLOW, "resume", run_id], env=env, cwd=folder, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        def leased():
            assert first.poll() is None, first.communicate()[1][-2000:]
            return client.get_run(run_id).data.params.get(f"{lease.PARAM}1")
        owner = wait_for(leased, "the first resume's lease", 600).split()[0]
        before = client.get_run(run_id).data
        second = clr("resume", run_id, env=env, cwd=folder)
        line = one_line_error(second)
        assert f"Expected run {run_id} to be free to resume, but {owner} holds its lease (generation 1" in line
        assert f"a lease without a heartbeat for {lease.TIMEOUT:g} s may be taken over" in line
        after = client.get_run(run_id).data
        assert after.params == before.params  # no generation of its own, nothing else logged
        assert {k: v for k, v in after.tags.items() if k != f"{lease.PARAM}1"} == \
            {k: v for k, v in before.tags.items() if k != f"{lease.PARAM}1"}
        assert len(mlflow.search_runs(search_all_experiments=True)) == 1
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
        assert first.returncode == 143
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags[f"{lease.PARAM}1"] == "released"
    finally:
        if first.poll() is None:
            first.kill()
        mlflow.set_tracking_uri(None)


def _contend(uri, run_id, barrier, results):
    os.environ["MLFLOW_TRACKING_URI"] = uri
    barrier.wait()
    try:
        held = lease.Lease(run_id, heartbeat=3600).acquire()
        results.put(("won", held.owner))
        barrier.wait()  # hold it until every contender has tried
        held.release()
    except lease.LeaseHeld as e:
        results.put(("lost", str(e)))
        barrier.wait()


def test_of_processes_taking_a_lease_at_once_exactly_one_wins_and_a_stale_lease_is_taken_over(store):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("leases")).info.run_id
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(store, run_id, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=120)
    assert sorted(o for o, _ in outcomes) == ["lost"] * (n - 1) + ["won"], outcomes
    winner = next(who for o, who in outcomes if o == "won")
    assert all(f"but {winner} holds its lease" in why for o, why in outcomes if o == "lost")
    assert client.get_run(run_id).data.tags[f"{lease.PARAM}1"] == "released"
    # A lease whose owner died (taken long ago, never beaten) is taken over, as generation 3.
    client.log_param(run_id, f"{lease.PARAM}2", f"gone/1/dead {time.time() - 10_000:.3f}")
    with pytest.raises(lease.LeaseHeld):
        lease.Lease(run_id, timeout=100_000).acquire()  # not stale under a longer timeout
    taken = lease.Lease(run_id, timeout=60).acquire()
    assert taken.generation == 3
    taken.release()


# 4. Sweeps that cannot run -------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--cpus-per-trial", "1000"], "Expected --cpus-per-trial to fit the Ray cluster"),
    (["--gpus-per-trial", "1"] if not torch.cuda.is_available() else ["--gpus-per-trial", "1000"],
     "Expected --gpus-per-trial to fit the Ray cluster"),
    (["--ray-address", "127.0.0.1:{closed}"], "Expected --ray-address 127.0.0.1:{closed} to be a running Ray cluster"),
    (["--seeds", "0,1,2", "--grid", "batch_size=8,16,32", "--max-trials", "10"],
     "Expected at most --max-trials=10 trials, but this sweep makes at least 45"),
])
def test_a_sweep_that_cannot_run_is_one_line_before_its_parent_run_exists(store, tmp_path, args, needle):
    pytest.importorskip("ray")
    closed = str(free_port())
    args = [a.format(closed=closed) for a in args]
    res = clr("sweep", "--data-dir", str(tmp_path), "--base-lr", "0.01", "--max-lr", "0.1", *args,
              env=clean_env(store), cwd=tmp_path, timeout=600)
    line = one_line_error(res, code=1 if "Ray" in needle else 2)
    assert needle.format(closed=closed) in line, line
    assert mlflow.search_runs(search_all_experiments=True).empty


# 5. A store that is not there ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["closed port", "sqlite in a missing folder"])
def test_every_reading_command_says_the_store_is_unreachable_and_creates_nothing(tmp_path, kind):
    missing = tmp_path / "missing"
    uri = f"http://127.0.0.1:{free_port()}" if kind == "closed port" else f"sqlite:///{missing / 'mlflow.db'}"
    needle = "did not answer within 10 s" if kind == "closed port" else "but there is no such file"
    for args in (["compare", "--experiment", "x"], ["reproduce", HEX], ["resume", HEX]):
        started = time.monotonic()
        line = one_line_error(in_process(*args, env=clean_env(uri)))
        assert needle in line and "existing run" not in line, line
        assert time.monotonic() - started < 120  # seconds, not MLflow's minutes of retries
    assert not missing.exists()  # no folder, no SQLite file made for it


# 6. A rejected input inside `mlflow run` ------------------------------------------------------

@pytest.mark.parametrize("entry,param,needle", [
    ("resume", "run_id=*", "Error: Expected RUN_ID to be a run id of 32 lowercase hex characters, but got '*'"),
    ("range_test", "limit_train=1e3", "Error: Invalid value for '--limit-train': '1e3' is not a valid integer."),
])
def test_a_rejected_input_inside_mlflow_run_is_our_line_no_traceback_and_a_failed_run(store, tmp_path, entry,
                                                                                       param, needle):
    cmd = ["mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local", "--experiment-name", "bad",
           "-P", f"data_dir={tmp_path}", "-P", param] if entry != "resume" else \
        ["mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local", "--experiment-name", "bad", "-P", param]
    res = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(store), timeout=600)
    assert res.returncode != 0 and needle in res.stderr.splitlines(), res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["bad"])
    assert list(runs["status"]) == ["FAILED"]
    assert runs["tags.clr_mlflow.kind"][0] == "rejected"
    assert runs["tags.mlflow.note.content"][0] == needle.removeprefix("Error: ")
