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
(sync.py; delivery.py holds the sending side: `deliver`, the replayers, `replay`). What is
read back (by sync, resume, and a process inheriting a dead one's folder) is checked first
(spool_check.py): only a private folder of ours, naming only files inside it.

A full disk. Writing the spool can fail (no room, a read-only disk): metric chunks then go
to the store only, and an op the store did not take is staged, if it has files, in a
private folder of the system's temporary directory (`kept_elsewhere`). When neither the
store nor the spool takes a run's values, the spool is `stranded`: IterationLogger raises
`Stranded` (a core StopRequested) to the loop, which finishes the iteration, checkpoints
and stops; its message says what was kept and where. A small `reserve` file, made when
the folder is, is given up then so that the run's end status still fits in the journal.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import logging
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import mlflow

from clr_mlflow.core.interrupts import StopRequested
from clr_mlflow.tracking.journal import (MappedJournal, decode_metrics, encode_metrics, read_journal,  # noqa: F401
                                         reserve_blocks)
from clr_mlflow.tracking.spool_check import (JOURNAL, LOCK_FILE, RUN_FILE, SyncError, check_folder,  # noqa: F401
                                             private_dir, read_meta)

RESERVE_FILE, RESERVE_BYTES = "reserve", 16 << 10  # room kept for the end status when the disk fills

log = logging.getLogger(__name__)


def spool_root() -> Path:
    """Where spool folders live: $CLR_MLFLOW_SPOOL_DIR, else the per-user cache directory.
    Never the working directory: the library runs inside other people's programs."""
    if os.environ.get("CLR_MLFLOW_SPOOL_DIR"):
        return Path(os.environ["CLR_MLFLOW_SPOOL_DIR"]).absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(cache) / "clr_mlflow" / "spool").absolute()


def short(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno and error.strerror:  # not the file names: they are said around it
        return f"{type(error).__name__}: [Errno {error.errno}] {error.strerror}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def _absolute_uri(uri: str) -> str:
    """A relative SQLite or file store made absolute, so `sync` finds it from anywhere."""
    from clr_mlflow.tracking.history import absolute_store_uri  # history imports tracking, which imports us

    return absolute_store_uri(uri)


# One run's spool in this process ---------------------------------------------------------

class Stranded(StopRequested):
    """Neither the store nor the spool takes a run's values: the loop stops (see the module's
    docstring). Its line is made when it is shown, so it says what the checkpoint and the end
    status that came after it found."""

    def __init__(self, spool: "Spool"):
        super().__init__(spool.run_id)
        self.spool = spool

    def __str__(self) -> str:
        return self.spool.stranded_line(self.iteration)


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
        self.full: OSError | None = None      # the last write the spool's disk refused
        self.stranded = False                 # values neither the store nor the spool took: the run stops
        self.stop_raised = False              # a Stranded was raised to the loop: its line says it all
        self.kept_elsewhere: dict[str, Path] = {}  # what the spool could not take: run path -> local copy
        self.not_kept: list[str] = []         # ops kept nowhere
        self.lost: list[tuple[int, int, int]] = []  # metric values kept nowhere: (first step, last step, count)
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
            made = not folder.exists()
            private_dir(folder)
            try:
                if (folder / RUN_FILE).exists() and read_meta(folder)["run_id"] != self.run_id:
                    raise SyncError(f"{folder / RUN_FILE} names another run than {self.run_id}: not taken over")
                lock = open(folder / LOCK_FILE, "a+")
            except (OSError, SyncError) as e:
                self._undo(folder, made)
                raise PermissionError(str(e)) if isinstance(e, SyncError) else e from None
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock.close()
        else:
            raise RuntimeError(f"spool folders of run {self.run_id} under {root} are held by other processes")
        try:
            self._fill(folder)
        except BaseException:  # no room (or no right) to write: nothing half made is left
            lock.close()
            self._undo(folder, made)
            raise
        self._lock_file, self.dir = lock, folder

    @staticmethod
    def _undo(folder: Path, made: bool) -> None:
        if made:
            shutil.rmtree(folder, ignore_errors=True)

    def _fill(self, folder: Path) -> None:
        """The reserve (first: a nearly full disk gives its last room to the end status),
        the journal (a dead process's, taken over), run.json."""
        with contextlib.suppress(OSError):  # no room for it: the disk is nearly full already
            fd = os.open(folder / RESERVE_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                reserve_blocks(fd, RESERVE_BYTES)
            finally:
                os.close(fd)
        journal = MappedJournal(folder / JOURNAL)
        try:
            self.inherited = len(read_journal(folder))  # left by a process that died: they wait ahead of ours
            meta = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "pid": os.getpid()}
            (folder / (RUN_FILE + ".tmp")).write_text(json.dumps(meta))
            os.replace(folder / (RUN_FILE + ".tmp"), folder / RUN_FILE)
        except BaseException:
            journal.close()
            raise
        self.sequence = max(self.sequence, self.inherited)  # its files/<n> folders stay its own
        self._journal = journal

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
            except (OSError, SyncError) as e:  # a full disk: the values still go to the store, just not spooled
                self._refused(e)
                if self.away:  # and the store does not take them either
                    self.stranded = True
                return 0
            self.in_flight.add(token)
        return token

    def _refused(self, error: BaseException) -> None:
        if not self.unwritable:
            log.warning(f"warning: run {self.run_id}: the spool {self.dir or spool_root() / self.run_id} cannot be "
                        f"written ({short(error)}); values go to the store only")
        self.unwritable = True
        if isinstance(error, OSError):
            self.full = error

    def strand(self, first: int, last: int, count: int) -> None:
        """Metric values neither the store nor the spool took (the writer gave up on them)."""
        with self.lock:
            self.stranded = True
            self.lost.append((first, last, count))

    def stranded_line(self, iteration: int | None) -> str:
        """The one line of a run that stopped because nothing could keep its values."""
        where = self.dir or spool_root() / self.run_id
        why = f" ({short(self.full)})" if self.full else ""
        at = f" at iteration {iteration}" if iteration is not None else ""
        parts = [f"run {self.run_id} stopped{at}: the tracking store {self.tracking_uri} does not answer and the "
                 f"spool {where} has no room left{why}"]
        if self.dir is not None and (self.dir / JOURNAL).exists():
            ended = any(e.get("op") == "status" for e in self.waiting)
            parts.append(f"kept in {where}: what it journaled{' and the end status' if ended else ''} (send it "
                         f"with `clr-mlflow sync {where}` once the store answers)")
        parts += [f"{name} kept at {path}" for name, path in self.kept_elsewhere.items()]
        if self.lost:
            count, first, last = sum(n for *_, n in self.lost), min(f for f, *_ in self.lost), max(l for _, l, _ in self.lost)
            parts.append(f"kept nowhere: {count} metric values of steps {first}-{last}")
        if self.not_kept:
            parts.append(f"kept nowhere: {', '.join(self.not_kept)}")
        return "; ".join(parts)

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

    def journal_op(self, kind: str, payload: dict, stage: Callable[[Path], None] | None) -> bool:
        """Journal an op the store did not take. True when the spool took it; False when it
        could not (a full disk): then the run is stranded, its files are kept in a private
        folder elsewhere if any room allows, and a status uses the folder's reserve."""
        with self.lock:
            try:
                self._journal_op(kind, payload, stage)
                return True
            except (OSError, SyncError) as e:
                self._refused(e)
                if kind == "status" and self.dir is not None and (self.dir / RESERVE_FILE).exists():
                    with contextlib.suppress(OSError, SyncError):
                        (self.dir / RESERVE_FILE).unlink()  # the room kept for this
                        self._journal_op(kind, payload, stage)
                        return True
            self.stranded = True
            self._keep_elsewhere(kind, payload, stage)
            return False

    def _keep_elsewhere(self, kind: str, payload: dict, stage: Callable[[Path], None] | None) -> None:
        name = payload.get("path") or (kind if kind != "status" else f"the end status {payload.get('status')}")
        if stage is None:
            keys = sorted(payload.get(kind) or payload.get("keys") or {})
            self.not_kept.append(name if kind in ("status", "model") else f"{kind} {', '.join(keys)}".strip())
            return
        root = Path(tempfile.gettempdir()) / f"clr_mlflow-kept-{os.geteuid()}" / self.run_id
        folder = root / (posixpath.dirname(name) if kind in ("artifact", "table") else kind)
        try:
            private_dir(root)
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            stage(folder)
        except OSError:
            self.not_kept.append(name)
            return
        self.kept_elsewhere[name] = folder / posixpath.basename(name) if kind in ("artifact", "table") else folder
        log.debug(f"run {self.run_id}: {name} kept at {self.kept_elsewhere[name]}")

    def _journal_op(self, kind: str, payload: dict, stage: Callable[[Path], None] | None) -> None:
        self._open()
        entry = {"op": kind, **payload}
        if stage is not None:
            entry["files"] = f"files/{self.sequence + 1:05d}"
            folder = self.dir / entry["files"]
            shutil.rmtree(folder, ignore_errors=True)
            try:
                folder.mkdir(parents=True)
                stage(folder)
                self._write(entry)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # a half-written file frees its room
                raise
        else:
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


def held_here(path: Path) -> Spool | None:
    """This process's spool whose folder is `path`, if any (its lock is held already)."""
    return next((s for s in list(_registry.values()) if s.dir is not None and s.dir == path.absolute()), None)
