"""`clr-mlflow sync`: send a spool folder a run left behind (tracking layer, writing).

The folder is checked before anything in it is read (spool_check: ours, private, run.json
well formed, every journal entry well formed and naming only files inside the folder), then
sent in journal order by delivery.replay. Anything that cannot be sent is one line and the
folder stays (a second sync skips what arrived); the folder goes once all of it was taken.
"""
from __future__ import annotations

import contextlib
import fcntl
import shutil
from pathlib import Path

from clr_mlflow.tracking import assets  # noqa: F401 - registers the model and inputs replayers
from clr_mlflow.tracking import delivery, spool
from clr_mlflow.tracking.spool_check import LOCK_FILE, RUN_FILE, SyncError, check_folder, read_meta


def sync(path: str | Path, tracking_uri: str | None = None, run_id: str | None = None) -> str:
    """Send a spool folder (or every run folder under a spool root) to its run's store: the
    URI in run.json, unless `tracking_uri` is given (a store that moved). `run_id`: only a
    folder whose run.json names that run (resume). A line per run; SyncError when it is no
    spool, not trusted or damaged, a live process holds it, or the store does not answer."""
    path = Path(path)
    if not (path / RUN_FILE).is_file():
        runs = sorted(p for p in path.glob("*") if (p / RUN_FILE).is_file()) if path.is_dir() else []
        if not runs:
            raise SyncError(f"Expected a clr_mlflow spool folder (with {RUN_FILE}) or a folder of them, but "
                            f"{path} is neither")
        return "\n".join(sync(run, tracking_uri, run_id) for run in runs)
    check_folder(path)
    meta = read_meta(path)
    if run_id is not None and meta["run_id"] != run_id:
        raise SyncError(f"Expected {path / RUN_FILE} to name run {run_id}, but it names {meta['run_id']}: not sent")
    return _send(path, meta, tracking_uri or meta["tracking_uri"])


def _send(path: Path, meta: dict, uri: str) -> str:
    run_id = meta["run_id"]
    own = spool.held_here(path)
    with open(path / LOCK_FILE, "a+") as lock:
        try:
            if own is None:  # this process holds the lock of its own spools already
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif own.holders:
                raise BlockingIOError
        except BlockingIOError:
            raise SyncError(f"{path} is in use by a live process (pid {meta.get('pid', '?')}): it sends the spool "
                            "itself; sync once it has ended") from None
        delivery.check_journal(path)  # damaged or untrusted entries: one line, nothing sent
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
            raise SyncError(f"Sending run {run_id} to {uri} failed: the store {how} ({spool.short(e)}); it stays "
                            f"spooled in {path} (a second sync skips what arrived)") from None
        if own is not None:
            own.all_delivered()
            own.release()
            return summary
        shutil.rmtree(path)
    with contextlib.suppress(OSError):
        path.parent.rmdir()
    return summary
