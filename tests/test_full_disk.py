"""A full spool disk, on a real small filesystem (a tmpfs this test mounts as
CLR_MLFLOW_SPOOL_DIR): with the store there, the values go to it directly and the run ends
FINISHED; with the store away too, the training stops at an iteration's end with one line
saying what was kept and where, and its honest end status reaches the store with `sync`.

The store goes away at a moment fixed by the run itself, not by a clock: a real `mlflow
server` behind a loopback proxy (a thread of this test) that goes dark when the first
train/lr values reach it. From there on the run writes more than the tmpfs holds (each
metric chunk is ~100 KB of journal; the tmpfs is 256 KB), whatever the machine's speed."""
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from servers import LOOPBACK, cli_in_process, relay, shared_sqlite_server

from clr_mlflow.core import checkpoint
from clr_mlflow.tracking import delivery
from clr_mlflow.tracking.iteration_logger import IterationLogger
from clr_mlflow.tracking.runs import active_run, log_artifact_file, log_metrics, undelivered

CLR_MLFLOW = str(Path(sys.executable).parent / "clr-mlflow")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB tmpfs mounted for this test; unmounted after."""
    folder = tmp_path / "spool"
    folder.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {out.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Take every free block of the filesystem under `folder`."""
    with open(folder / "ballast", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_full_spool_with_the_store_there_sends_everything_directly(tracking, small_disk, monkeypatch, caplog,
                                                                    tmp_path):
    monkeypatch.setenv("CLR_MLFLOW_SPOOL_DIR", str(small_disk))
    fill(small_disk)
    artifact = tmp_path / "checkpoint.txt"
    artifact.write_text("weights")
    with active_run("full") as run, IterationLogger() as log:
        for start in range(0, 3000, 500):
            log.series(np.arange(start, start + 500), {"x/lr": np.arange(start, start + 500) * 0.1})
            log.flush()
        log_metrics({"test/accuracy": 0.5})
        log_artifact_file(artifact, "train")
    client = MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "x/lr")) == list(range(3000))
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["test/accuracy"] == 0.5
    assert [a.path for a in client.list_artifacts(run.info.run_id, "train")] == ["train/checkpoint.txt"]
    assert "cannot be written" in caplog.text and "values go to the store only" in caplog.text
    assert undelivered(run.info.run_id) is None and sorted(p.name for p in small_disk.iterdir()) == ["ballast"]


class DarkeningProxy:
    """A loopback HTTP proxy to `upstream` that, when a request carrying `trigger` arrives,
    drops it unanswered and stops listening (connections refused from then on: the store
    is away). `bring_back()` listens again on the same port."""

    def __init__(self, upstream: str, trigger: bytes):
        self.upstream, self.trigger = urllib.parse.urlsplit(upstream), trigger
        self.dark = threading.Event()
        self.server = self._serve(0)
        self.port = self.server.server_address[1]
        self.uri = f"http://{LOOPBACK}:{self.port}"

    def _serve(self, port: int) -> ThreadingHTTPServer:
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.dark.is_set() or (proxy.trigger in body and not proxy.dark.is_set()):
                    if not proxy.dark.is_set():
                        proxy.dark.set()
                        threading.Thread(target=proxy._go_dark, args=(proxy.server,), daemon=True).start()
                    self.close_connection = True
                    return  # no answer: the client sees the connection dropped
                relay(self, proxy.upstream, body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer((LOOPBACK, port), Forward)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    @staticmethod
    def _go_dark(server) -> None:
        server.shutdown()
        server.server_close()

    def bring_back(self) -> None:
        self.server = self._serve(self.port)
        self.dark.clear()
        self.trigger = b"\0never\0"

    def close(self) -> None:
        if not self.dark.is_set():
            self._go_dark(self.server)


@pytest.fixture
def store(request):
    """A proxy of its own in front of the test process's `mlflow server` on SQLite
    (servers.shared_sqlite_server, shared with test_outages.py: this test's runs are in an
    experiment of its own); the proxy, not the server, goes dark."""
    server = shared_sqlite_server(request.config)
    proxy = DarkeningProxy(server.uri, trigger=b'"train/lr"')
    try:
        yield proxy, MlflowClient(server.uri)
    finally:
        proxy.close()


def test_store_away_and_spool_full_the_training_stops_in_one_line_and_sync_ends_it_failed(store, small_disk,
                                                                                        tmp_path, cifar, data_dir):
    proxy, client = store
    iterations = 3000
    env = dict(os.environ, MLFLOW_TRACKING_URI=proxy.uri, CLR_MLFLOW_SPOOL_DIR=str(small_disk),
               TMPDIR=str(tmp_path), **delivery.HTTP_RETRY_LIMITS,
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one torch thread: two spin against each other on busy cores
    env.pop("MLFLOW_RUN_ID", None)
    args = ["train", "--data", str(cifar), "--data-dir", str(data_dir), "--limit-train", "400", "--limit-test", "64",
            "--batch-size", "32", "--base-lr", "0.01", "--max-lr", "0.1", "--iterations", str(iterations),
            "--step-size", "50", "--device", "cpu", "--experiment", "full", "--system-metrics", "false"]
    res = subprocess.run([CLR_MLFLOW, *args], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proxy.dark.is_set(), res.stderr[-3000:]
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-5000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, res.stderr[-5000:]
    assert "has not taken every value" not in res.stderr and "ended FAILED while" not in res.stderr  # said once
    line = errors[0]
    found = re.match(r"Error: run ([0-9a-f]{32}) stopped at iteration (\d+): the tracking store \S+ does not answer "
                     r"and the spool (\S+) has no room left \(OSError: \[Errno 28\]", line)
    assert found, line
    run_id, stopped, folder = found[1], int(found[2]), Path(found[3])
    assert 0 < stopped < iterations and folder == small_disk / run_id
    assert f"kept in {folder}: what it journaled and the end status (send it with `clr-mlflow sync {folder}`" in line
    assert client.get_run(run_id).info.status == "RUNNING"  # the store has not heard yet

    # The checkpoint of the stop: in the spool, or kept at a path the line names.
    kept = re.search(r"train/checkpoint\.pt kept at (\S+?)(;|$)", line)
    if kept:
        state = checkpoint.load(kept[1])
        assert state["loop"]["t"] == stopped
    lost = re.search(r"kept nowhere: (\d+) metric values of steps (\d+)-(\d+)", line)

    proxy.bring_back()  # the store answers again: sync ends the run as it ended
    done = cli_in_process(["sync", folder], env)  # after the fact: in this process
    assert done.exit_code == 0, done.stderr[-3000:]
    assert "status FAILED delivered" in done.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    steps = {m.step for m in client.get_metric_history(run_id, "train/lr")}
    missing = set(range(stopped)) - steps
    if lost:  # what was lost is said, and is all that is missing
        assert missing <= set(range(int(lost[2]), int(lost[3]) + 1)), (sorted(missing)[:5], line)
    else:
        assert not missing
    if not kept:
        assert "train/checkpoint.pt" in {a.path for a in client.list_artifacts(run_id, "train")}
    assert not folder.exists()
