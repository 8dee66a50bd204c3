"""A real PostgreSQL 15 and a real `mlflow server` on it, for tests and scripts/bench_store.py.

`PostgresServer` runs initdb / pg_ctl in a fresh temporary directory as the unprivileged
`postgres` user (when we are root; as ourselves otherwise), listening only on 127.0.0.1 on
a free port with its unix socket in that directory, and creates one database.
`MlflowServer` runs `mlflow server --backend-store-uri postgresql://... --serve-artifacts`
(or any backend URI, e.g. a SQLite file) in its own process group on another free loopback
port and waits for `/health`; `crash()` SIGKILLs it and `restart()` brings it back on the
same port with the same stores (tests/test_outages.py). Both are context managers that stop
their process and remove their directory on exit. `LookupBarrier` is a real HTTP proxy (a
thread of the test process) in front of one that holds the first experiment lookups until
all have arrived.
The pytest fixtures `pg_server` and `mlflow_server` (session-scoped) wrap them;
`shared_sqlite_server()` is one `mlflow server` on a SQLite file for the whole test process
(test_outages.py and test_full_disk.py share it, each test in experiments of its own).
`cli_in_process` runs a `clr-mlflow` command in this process (click's CliRunner), for the
commands whose own process is not what a test is about; `forked_clis` runs several at once,
each in a process of its own forked after the imports.
"""
from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
PG_USER = "postgres"


def _pg_driver() -> str:
    for name, module in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        try:
            __import__(module)
            return name
        except ImportError:
            pass
    return "psycopg2"


PG_DRIVER = _pg_driver()


def pg_bin_dir() -> Path | None:
    """Folder holding initdb, pg_ctl and postgres: $CLR_MLFLOW_PG_BIN, else PostgreSQL 15's
    Debian location, else wherever initdb is on PATH; None when they are truly absent."""
    candidates = [os.environ.get("CLR_MLFLOW_PG_BIN"), "/usr/lib/postgresql/15/bin"]
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for c in candidates:
        if c and all((Path(c) / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


class _TempService:
    """A server living in a temporary folder (`root`): `stop()` halts it, then removes the
    folder; a context manager that stops it also when starting fails half way."""

    root: Path | None = None

    def _halt(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        try:
            self._halt()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class PostgresServer(_TempService):
    """A throwaway PostgreSQL cluster: `with PostgresServer() as pg: pg.uri`.

    durable=False (the tests' default) turns off fsync and synchronous commit: the data
    is thrown away anyway. durable=True keeps PostgreSQL's defaults (for benchmarks)."""

    def __init__(self, database: str = "mlflow", durable: bool = False, bin_dir: Path | None = None,
                 start_timeout: float = 300.0):
        self.bin = bin_dir or pg_bin_dir()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl, postgres) not found")
        self.database = database
        self.durable = durable
        self.start_timeout = start_timeout
        self.root: Path | None = None
        self.port: int | None = None
        self.started = False

    # Commands run as the postgres user when we are root (initdb refuses to run as root).
    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []

    def _run(self, *args, check=True, timeout=None) -> subprocess.CompletedProcess:
        cmd = self._as_owner() + [str(self.bin / args[0]), *map(str, args[1:])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root,
                             env=os.environ | {"LC_ALL": "C", "PGTZ": "UTC"})
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
                               f"\n--- server log ---\n{_tail(self.log)}")
        return out

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def uri(self) -> str:
        # The driver is named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, while the
        # test extra installs psycopg2-binary.
        return f"postgresql+{PG_DRIVER}://{PG_USER}@{LOOPBACK}:{self.port}/{self.database}"

    def start(self) -> "PostgresServer":
        # Directly under the system temp dir (not pytest's 0700 tree), so the postgres user
        # can reach it; the directory itself is handed over to that user.
        self.root = Path(tempfile.mkdtemp(prefix="clr_mlflow_pg_"))
        if os.geteuid() == 0:
            owner = pwd.getpwnam(PG_USER)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        os.chmod(self.root, 0o700)
        self._run("initdb", "-D", self.data, "-U", PG_USER, "--auth=trust", "--encoding=UTF8", "--locale=C",
                  "--no-sync", timeout=120)
        settings = [f"listen_addresses={LOOPBACK}", f"unix_socket_directories={self.root}", "max_connections=100",
                    "shared_buffers=32MB", "logging_collector=off"]
        if not self.durable:
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        last_error = None
        for _attempt in range(3):  # the free port may be taken between free_port() and the bind
            self.port = free_port()
            opts = " ".join(f"-c {s}" for s in settings) + f" -p {self.port}"
            out = self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t",
                            int(self.start_timeout), "start", check=False, timeout=self.start_timeout + 30)
            if out.returncode == 0:
                self.started = True
                break
            last_error = f"{out.stdout}\n{out.stderr}\n{_tail(self.log)}"
        else:
            raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")
        self._run("createdb", "-h", LOOPBACK, "-p", self.port, "-U", PG_USER, self.database, timeout=60)
        return self

    def _halt(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", self.data, "stop", "-m", "fast", "-w", "-t", 60, check=False, timeout=90)
            self.started = False


class MlflowServer(_TempService):
    """`mlflow server` on a backend store URI, proxying artifacts into a temporary folder:
    `with MlflowServer(pg.uri) as server: server.uri` (http://127.0.0.1:PORT)."""

    def __init__(self, backend_uri: str, workers: int = 2, start_timeout: float = 600.0):
        self.backend_uri = backend_uri
        self.workers = workers
        self.start_timeout = start_timeout
        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=10) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> "MlflowServer":
        self.root = Path(tempfile.mkdtemp(prefix="clr_mlflow_server_"))
        (self.root / "artifacts").mkdir()
        for _attempt in range(3):
            self.port = free_port()
            if self._launch():
                return self
        raise RuntimeError(f"mlflow server could not bind a free port:\n{_tail(self.log, 6000)}")

    def _launch(self) -> bool:
        """Start the server on `self.port`: True once it answers /health, False when the
        port was taken; raises when it fails otherwise."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No job runner: MLflow 3's server otherwise starts a job runner and eight huey
        # consumers (each a Python importing MLflow: tens of seconds of CPU a start or restart
        # on two cores) for jobs (GenAI scorers, trace rollups) that no test here uses.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "server",
               "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
               "--host", LOOPBACK, "--port", str(self.port), "--workers", str(self.workers)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and self.proc.poll() is None and not self._healthy():
            time.sleep(0.5)
        if self.proc.poll() is None and self._healthy():
            return True
        exited = self.proc.poll() is not None
        self._kill()
        if not exited or "address already in use" not in _tail(self.log).lower():
            why = "exited" if exited else f"did not answer /health within {self.start_timeout:.0f}s"
            raise RuntimeError(f"mlflow server on {self.backend_uri} {why}:\n{_tail(self.log, 6000)}")
        return False

    def crash(self) -> None:
        """SIGKILL the server and its workers, as a machine or an OOM killer would: no
        goodbye to its clients. Its stores stay for `restart`."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def restart(self, timeout: float = 60.0) -> None:
        """The same server again: same port, backend store and artifacts (the port is free
        again, but a closing socket may hold it for a moment)."""
        deadline = time.monotonic() + timeout
        while not self._launch():
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} stayed taken:\n{_tail(self.log, 6000)}")
            time.sleep(1)

    def _kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        # workers that outlived their parent are still in the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def _halt(self) -> None:
        self._kill()


def relay(handler: BaseHTTPRequestHandler, upstream: urllib.parse.SplitResult, body: bytes) -> None:
    """Send the request `handler` is serving (its body already read) on to `upstream` and
    write the answer back: the forwarding half of the test proxies in front of a server."""
    conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
    try:
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(handler.command, handler.path, body=body or None, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
    finally:
        conn.close()
    handler.send_response(answer.status)
    for k, v in answer.getheaders():
        if k.lower() not in ("connection", "content-length", "transfer-encoding"):
            handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class LookupBarrier:
    """An HTTP proxy (127.0.0.1) in front of a tracking server that holds the first `parties`
    experiment lookups by name until all of them have arrived, then lets them through
    together: every client finds no experiment and goes on to create it, the race of
    processes started at once, made certain instead of rare. Every later lookup and every
    other GET/POST/PUT/PATCH/DELETE with a Content-Length body (MLflow's tracking calls)
    passes straight through. `with LookupBarrier(uri, 3) as proxy: proxy.uri`."""

    LOOKUP = "/api/2.0/mlflow/experiments/get-by-name"

    def __init__(self, upstream: str, parties: int, timeout: float = 120.0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.parties, self.arrived, self.lock = parties, 0, threading.Lock()
        self.barrier = threading.Barrier(parties, timeout=timeout)  # broken on timeout: the lookup fails
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith(proxy.LOOKUP) and proxy._first_lookup():
                    proxy.barrier.wait()
                relay(self, proxy.upstream, body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Forward)
        self.uri = f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def _first_lookup(self) -> bool:
        with self.lock:
            self.arrived += 1
            return self.arrived <= self.parties

    def __enter__(self) -> "LookupBarrier":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL 15 on 127.0.0.1 with an empty database; yields its postgresql:// URI."""
    if pg_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) are not installed: "
                    "looked in $CLR_MLFLOW_PG_BIN, /usr/lib/postgresql/15/bin and PATH")
    with PostgresServer() as pg:
        yield pg.uri


@pytest.fixture(scope="session")
def mlflow_server(pg_server):
    """A real `mlflow server` on the PostgreSQL database, serving artifacts; yields its http URI."""
    with MlflowServer(pg_server) as server:
        yield server.uri


_SHARED: dict[str, MlflowServer] = {}


def shared_sqlite_server(config: pytest.Config) -> MlflowServer:
    """One real `mlflow server` on its own SQLite file, serving artifacts, started once per
    test process (an xdist worker) and stopped at the end of its pytest session (`config`'s
    cleanup; at exit too, should that not run): starting one costs seconds of CPU (minutes on
    a busy machine). A test may crash it; it is up again when this returns (`up_again`).
    Tests keep to experiments of their own."""
    if "sqlite" not in _SHARED:
        folder = Path(tempfile.mkdtemp(prefix="clr_mlflow_sqlite_server_"))
        server = MlflowServer(f"sqlite:///{folder / 'server.db'}", workers=1)

        def stop() -> None:  # twice is harmless: stop() forgets what it stopped
            server.stop()
            shutil.rmtree(folder, ignore_errors=True)

        atexit.register(stop)
        config.add_cleanup(stop)
        server.__enter__()
        _SHARED["sqlite"] = server
    return up_again(_SHARED["sqlite"])


def up_again(server: MlflowServer) -> MlflowServer:
    """`server`, restarted (same port and stores) when a test crashed it and left it down."""
    if server.proc is None:
        server.restart()
    return server


def cli_in_process(args, env: dict[str, str]):
    """`clr-mlflow ARGS` run in this process by click's CliRunner with `env` set (its
    MLFLOW_TRACKING_URI, when given, also made MLflow's tracking URI for the call): a
    `click.testing.Result` (exit_code: the command's sys.exit code; stdout, stderr). For
    commands whose own process is not the point (sync after the fact, compare, reproduce):
    a `clr-mlflow` subprocess costs seconds of imports. This process's environment, MLflow
    tracking URI and active experiment are as before afterwards."""
    import mlflow
    from click.testing import CliRunner
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from clr_mlflow.app.cli import main

    saved_env, saved_uri = dict(os.environ), tracking_utils._tracking_uri
    saved_experiment = mlflow.tracking.fluent._active_experiment_id
    try:
        if env.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        os.environ.clear()
        os.environ.update(saved_env)
        mlflow.set_tracking_uri(saved_uri)
        mlflow.tracking.fluent._active_experiment_id = saved_experiment


# `clr-mlflow` processes forked, all at once, from one that has made the imports a command
# makes (seconds of CPU a process: eight started apart took a minute of a test's time), each
# then running the console script's entry point (run_cli) with its own argv, its stdout and
# stderr in a log file of its own; the forker prints one line "<log> <exit code>" a child.
_FORKER = """
import json, os, sys, traceback
import mlflow, mlflow.store.tracking.rest_store, pandas, torch
from clr_mlflow.app import cli, runner
children = {}
for log, args in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.argv = ["clr-mlflow", *args]
        code = 1
        try:
            cli.run_cli()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    children[pid] = log
for _ in children:
    pid, status = os.wait()
    print(children[pid], os.waitstatus_to_exitcode(status), flush=True)
"""


def forked_clis(jobs: list[tuple[str, list[str]]], env: dict[str, str], cwd: Path, timeout: float) -> dict[str, int]:
    """Run `clr-mlflow ARGS` for each (log file, ARGS) of `jobs` in processes of their own,
    started at once (forked after the imports, see _FORKER); their exit codes by log file.
    None of them outlives the call: on timeout the whole group is killed."""
    import json

    forker = subprocess.Popen([sys.executable, "-c", _FORKER, json.dumps([(str(log), [str(a) for a in args])
                                                                           for log, args in jobs])],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        out, err = forker.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(forker.pid, signal.SIGKILL)  # the forker and its children
        raise
    codes = {log: int(code) for log, code in (line.rsplit(" ", 1) for line in out.splitlines())}
    assert forker.returncode == 0 and len(codes) == len(jobs), (forker.returncode, out, err[-5000:])
    return codes
