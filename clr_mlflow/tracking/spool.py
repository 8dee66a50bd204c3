"""The local spool (tracking layer, writing): what a run wrote, kept on disk until the
tracking store has taken it, so an outage or a SIGKILL loses nothing but the last seconds.

One folder per run, `$CLR_MLFLOW_SPOOL_DIR/<run_id>/` (default: the per-user cache,
`$XDG_CACHE_HOME/clr_mlflow/spool` or `~/.cache/clr_mlflow/spool`, never the caller's
working directory), made private to its owner (0700):
`run.json` (store URI, run id, pid), `lock` (flock held by the live writer), `journal.jsonl`
(one op a line, append-only; a torn last line after SIGKILL is ignored) and `files/` (the
artifacts and the model an op needs). Every metric chunk is journaled before it is sent;
every other op is journaled only once the store is away (`deliver`). The folder goes when
everything in it was delivered; `sync` sends a folder left behind, in journal order
(delivery.py holds the sending side: `deliver`, the replayers, `replay`).
"""
from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import glob
import json
import mmap
import os
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np

RUN_FILE, LOCK_FILE, JOURNAL = "run.json", "lock", "journal.jsonl"


class SyncError(ValueError):
    """A spool cannot be sent now: one line saying why."""


log = logging.getLogger(__name__)


def spool_root() -> Path:
    """Where spool folders live: $CLR_MLFLOW_SPOOL_DIR, else the per-user cache directory.
    Never the working directory: the library runs inside other people's programs."""
    if os.environ.get("CLR_MLFLOW_SPOOL_DIR"):
        return Path(os.environ["CLR_MLFLOW_SPOOL_DIR"]).absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(cache) / "clr_mlflow" / "spool").absolute()


def _private_dir(folder: Path) -> None:
    """Make `folder` (and missing parents) readable by its owner only: a spool holds a run's
    values, artifacts and model, and `sync` trusts only what its owner wrote."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask


def short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def _absolute_uri(uri: str) -> str:
    """A relative SQLite or file store made absolute, so `sync` finds it from anywhere."""
    from clr_mlflow.tracking.history import absolute_store_uri  # history imports tracking, which imports us

    return absolute_store_uri(uri)


# Metric chunks ---------------------------------------------------------------------------
# base64 of little-endian arrays: exact, NaN-safe, and ~20x cheaper than JSON floats, so
# journaling costs the loop almost nothing (docs/BENCHMARKS.md row 2).

def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def encode_metrics(chunks) -> dict:
    """[(timestamp_ms, steps, {key: values})] -> {key: {steps, values, ts}} (base64)."""
    keys = chunks[0][2].keys()
    if all(values.keys() == keys for _, _, values in chunks):  # the loops' case: one concatenation per key
        steps = _b64(np.concatenate([c[1] for c in chunks]), "<i8")
        ts = _b64(np.repeat(np.array([c[0] for c in chunks], dtype=np.int64), [len(c[1]) for c in chunks]), "<i8")
        return {key: {"steps": steps, "values": _b64(np.concatenate([c[2][key] for c in chunks]), "<f8"), "ts": ts}
                for key in keys}
    by_key: dict[str, tuple[list, list, list]] = {}
    for ts, steps, values in chunks:
        for key, vals in values.items():
            s, v, t = by_key.setdefault(key, ([], [], []))
            s.append(steps), v.append(vals), t.append(np.full(len(steps), ts, dtype=np.int64))
    return {key: {"steps": _b64(np.concatenate(s), "<i8"), "values": _b64(np.concatenate(v), "<f8"),
                  "ts": _b64(np.concatenate(t), "<i8")} for key, (s, v, t) in by_key.items()}


def decode_metrics(entry: dict) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A journaled metrics op -> {key: (steps, values, timestamps)}."""
    return {key: tuple(np.frombuffer(base64.b64decode(d[part]), dtype=dtype)
                       for part, dtype in (("steps", "<i8"), ("values", "<f8"), ("ts", "<i8")))
            for key, d in entry["keys"].items()}


def read_journal(folder: str | Path) -> list[dict]:
    """The ops of a spool's journal, in order. A last line cut short (SIGKILL while writing)
    is ignored; a bad line before it is an error."""
    try:
        raw = (Path(folder) / JOURNAL).read_bytes().replace(b"\0", b"")  # the unused room of a mapped journal
    except FileNotFoundError:
        return []
    lines = raw.split(b"\n")
    if lines[-1] and _torn(lines[-1]):
        lines[-1] = b""  # cut short by a SIGKILL while it was written
    entries = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise SyncError(f"{Path(folder) / JOURNAL} line {number} is not a journal entry") from None
    return entries


def _torn(line: bytes) -> bool:
    try:
        json.loads(line)
        return False
    except ValueError:
        return True


# One run's spool in this process ---------------------------------------------------------

class _MappedJournal:
    """An append-only file written through a shared memory map. An append is a memcpy that
    keeps the GIL, where write() would hand it to the busy MLflow writer thread for up to
    5 ms (measured with write(): bench row 2 at 0.3-0.7 us a value, noisy, against 0.27).
    The pages belong to the page cache, so a SIGKILL loses nothing appended. The room not
    used yet reads as NUL bytes (read_journal drops them); close() cuts it off."""

    def __init__(self, path: Path):
        raw = path.read_bytes().replace(b"\0", b"") if path.exists() else b""
        tail = raw[raw.rfind(b"\n") + 1:]
        if tail:  # left by a process that died: a torn line would spoil the next one
            raw = raw[:-len(tail)] if _torn(tail) else raw + b"\n"
        if raw:  # rewritten whole, then renamed over it: a kill half way loses none of it
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(raw)
            os.replace(tmp, path)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.end, self.size, self.map = len(raw), 0, None
        self._grow(0)

    def _grow(self, need: int) -> None:
        if self.map is not None:
            self.map.close()
        self.size = max(1 << 20, 2 * self.size, self.end + need)
        # Blocks reserved now: a full disk is an OSError here, not a SIGBUS in the loop.
        # macOS has no posix_fallocate, and ZFS / some NFS refuse it: a plain resize there.
        try:
            os.posix_fallocate(self.fd, 0, self.size)
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)

    def append(self, line: bytes) -> None:
        if self.end + len(line) > self.size:
            self._grow(len(line))
        self.map[self.end:self.end + len(line)] = line
        self.end += len(line)

    def close(self) -> None:
        self.map.close()
        os.ftruncate(self.fd, self.end)
        os.close(self.fd)


class Spool:
    """The spool of one run in this process: its folder is made when an IterationLogger
    opens or an op is journaled, and holds the lock until everything in it was delivered
    (then the folder goes), else until the process exits."""

    def __init__(self, run_id: str, tracking_uri: str):
        self.run_id, self.tracking_uri = run_id, _absolute_uri(tracking_uri)
        self.dir: Path | None = None
        self.away = False          # the last write failed for want of a store
        self.waiting: list[dict] = []  # ops this process journaled (not metric chunks), not yet delivered
        self.inherited = 0         # journal lines a dead process left: sent by a whole replay only
        self.stuck = False         # a waiting op the store refused: left to settle / sync
        self.in_flight: set[int] = set()  # metric chunks journaled, not yet taken by the store
        self.holders = 0           # open IterationLoggers
        self.sequence = 0
        self.unwritable = False
        self.lock = threading.Lock()
        self._journal = self._lock_file = None

    @property
    def waiting_ops(self) -> int:
        return len(self.waiting) + self.inherited

    @property
    def pending(self) -> bool:
        return bool(self.waiting_ops or self.in_flight)

    @property
    def direct(self) -> bool:
        """Ops go straight to the store, not behind ones still waiting in the journal."""
        return not (self.away or self.waiting_ops)

    def open(self) -> None:
        """Make the folder, take its lock and open the journal now (else at the first write)."""
        with self.lock:
            try:
                self._open()
            except OSError as e:  # a full or read-only disk: the run goes on, unspooled
                log.warning(f"warning: run {self.run_id}: no spool ({e})")

    def _open(self) -> None:
        if self.dir is not None:
            return
        root = spool_root()
        for name in (self.run_id, f"{self.run_id}.{os.getpid()}"):  # the second if another live process has it
            folder = root / name
            _private_dir(folder)
            lock = open(folder / LOCK_FILE, "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock.close()
        else:
            raise RuntimeError(f"spool folders of run {self.run_id} under {root} are held by other processes")
        journal = _MappedJournal(folder / JOURNAL)
        self.inherited = len(read_journal(folder))  # left by a process that died: they wait ahead of ours
        self.sequence = max(self.sequence, self.inherited)  # its files/<n> folders stay its own
        meta = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "pid": os.getpid()}
        (folder / (RUN_FILE + ".tmp")).write_text(json.dumps(meta))
        os.replace(folder / (RUN_FILE + ".tmp"), folder / RUN_FILE)
        self._lock_file, self._journal, self.dir = lock, journal, folder

    def _write(self, entry: dict) -> int:
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        self._journal.append(line)  # in the page cache from here on: a SIGKILL does not lose it
        self.sequence += 1
        return self.sequence

    def append_metrics(self, chunks) -> int:
        """Journal a metric chunk before it is sent; returns its token for `delivered`."""
        entry = {"op": "metrics", "keys": encode_metrics(chunks)}
        with self.lock:
            try:
                self._open()
                token = self._write(entry)
            except OSError as e:  # a full disk: the values still go to the store, just not spooled
                if not self.unwritable:
                    log.warning(f"warning: run {self.run_id}: the spool cannot be written ({e}); values go to the "
                                "store only")
                self.unwritable = True
                return 0
            self.in_flight.add(token)
        return token

    def delivered(self, token: int) -> None:
        with self.lock:
            self.in_flight.discard(token)
            if self.away:
                self.away = False
                log.info(f"note: the tracking store {self.tracking_uri} answers again; run {self.run_id} goes on "
                         "sending")

    def went_away(self, error: BaseException) -> None:
        with self.lock:
            if not self.away:
                log.warning(f"warning: the tracking store {self.tracking_uri} did not take a write of run "
                            f"{self.run_id} ({short(error)}); what it has not taken is kept in "
                            f"{self.dir or spool_root() / self.run_id} and sent when it answers")
            self.away = True

    def journal_op(self, kind: str, payload: dict, stage: Callable[[Path], None] | None) -> None:
        with self.lock:
            self._open()
            entry = {"op": kind, **payload}
            if stage is not None:
                entry["files"] = f"files/{self.sequence + 1:05d}"
                folder = self.dir / entry["files"]
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                stage(folder)
            self._write(entry)
            if kind in ("artifact", "table"):  # a newer file at the same path (a checkpoint) replaces it
                for old in [e for e in self.waiting if e["op"] == kind and e["path"] == entry["path"]]:
                    self.waiting.remove(old)
                    shutil.rmtree(self.dir / old["files"], ignore_errors=True)
            self.waiting.append(entry)

    def all_delivered(self) -> None:
        with self.lock:
            self.waiting, self.inherited, self.away, self.stuck = [], 0, False, False
            self.in_flight.clear()

    def release(self, holder: bool = False) -> None:
        """A logger closed or the run ended: the folder goes once nothing in it waits."""
        with _registry_lock, self.lock:
            self.holders -= holder
            if self.holders > 0 or self.pending:
                return
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    self.dir.parent.rmdir()  # only when empty
                self._journal.close()
                self._lock_file.close()
                self.dir = None
            if _registry.get(self.run_id) is self:
                del _registry[self.run_id]


_registry: dict[str, Spool] = {}
_registry_lock = threading.Lock()


def acquire(run_id: str, tracking_uri: str | None = None, holder: bool = False) -> Spool:
    """This process's spool of `run_id` (made when absent); `holder`: an IterationLogger that
    will `release(holder=True)` it."""
    with _registry_lock:
        spool = _registry.get(run_id)
        if spool is None:
            spool = _registry[run_id] = Spool(run_id, tracking_uri or mlflow.get_tracking_uri())
        spool.holders += holder
        return spool


def get(run_id: str) -> Spool | None:
    """This process's spool of `run_id`, if it has one."""
    return _registry.get(run_id)


def pending_dir(run_id: str) -> Path | None:
    spool = _registry.get(run_id)
    return spool.dir if spool is not None and spool.pending else None


def folders(run_id: str) -> list[Path]:
    """The spool folders of `run_id` under the spool root (left by a process that died, or
    by one whose store was away; `<run_id>.<pid>` when two processes wrote it)."""
    root = spool_root()
    return [f for f in [root / run_id, *sorted(root.glob(f"{glob.escape(run_id)}.*"))] if (f / RUN_FILE).is_file()]


def find(run_id: str) -> Path | None:
    """The first of `folders(run_id)`, or None."""
    found = folders(run_id)
    return found[0] if found else None


def sync(path: str | Path, tracking_uri: str | None = None) -> str:
    """Send a spool folder (or every run folder under a spool root) to its run's store: the
    URI in run.json, unless `tracking_uri` is given (a store that moved). A line per run;
    SyncError when it is no spool, a live process holds it, or the store does not answer."""
    path = Path(path)
    if not (path / RUN_FILE).is_file():
        runs = sorted(p for p in path.glob("*") if (p / RUN_FILE).is_file()) if path.is_dir() else []
        if not runs:
            raise SyncError(f"Expected a clr_mlflow spool folder (with {RUN_FILE}) or a folder of them, but "
                            f"{path} is neither")
        return "\n".join(sync(run, tracking_uri) for run in runs)
    try:
        meta = json.loads((path / RUN_FILE).read_text())
        run_id, uri = meta["run_id"], tracking_uri or meta["tracking_uri"]
    except (ValueError, KeyError):
        raise SyncError(f"Expected {path / RUN_FILE} to name a run and its store, but it does not") from None
    own = next((s for s in list(_registry.values()) if s.dir is not None and s.dir == path.absolute()), None)
    with open(path / LOCK_FILE, "a+") as lock:
        try:
            if own is None:  # this process holds the lock of its own spools already
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif own.holders:
                raise BlockingIOError
        except BlockingIOError:
            raise SyncError(f"{path} is in use by a live process (pid {meta.get('pid', '?')}): it sends the spool "
                            "itself; sync once it has ended") from None
        from clr_mlflow.tracking import delivery

        why = delivery.unreachable(uri)
        if why:
            raise SyncError(f"{why}; run {run_id} stays spooled in {path}")
        try:
            summary = delivery.replay(path, run_id, uri)
        except SyncError:
            raise
        except Exception as e:
            if not delivery.refused_or_away(e):
                raise
            how = "stopped answering" if delivery.is_outage(e) else "refused it"
            raise SyncError(f"Sending run {run_id} to {uri} failed: the store {how} ({short(e)}); it stays "
                            f"spooled in {path} (a second sync skips what arrived)") from None
        if own is not None:
            own.all_delivered()
            own.release()
            return summary
        shutil.rmtree(path)
    with contextlib.suppress(OSError):
        path.parent.rmdir()
    return summary
