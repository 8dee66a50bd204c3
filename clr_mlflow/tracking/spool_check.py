"""What `sync`, `resume` and a spool inherited from a dead process read, checked before any
of it is read or sent (tracking layer, local): a spool is trusted only as its owner wrote it.

- The folder: a real directory (no symlink), owned by the current user, writable by no one
  else (`check_folder`). A folder someone else could write may hold a journal they wrote.
- `run.json`: an object with a 32-hex `run_id` and a string `tracking_uri` (`read_meta`).
- Every journal entry, before anything is sent (`check_entries`): a known op with fields of
  the right types; every file it names (`files`, `file`) inside its folder, `..`, absolute
  paths and symlinks leading out refused, and present; an artifact's `path` in the run
  relative, without `..`; metrics that decode to arrays of one length; a status MLflow knows.
Each refusal is one line naming the file and the field (SyncError); nothing is sent then.
"""
from __future__ import annotations

import base64
import binascii
import os
import posixpath
import re
import stat
from pathlib import Path

RUN_FILE, LOCK_FILE, JOURNAL = "run.json", "lock", "journal.jsonl"
STATUSES = ("FINISHED", "FAILED", "KILLED")  # how a run ends (RUNNING and SCHEDULED do not end it)
RUN_ID = re.compile(r"[0-9a-f]{32}")


class SyncError(ValueError):
    """A spool cannot be sent now: one line saying why."""


def check_folder(folder: Path) -> None:
    """Refuse a spool folder that is a symlink, not ours, or writable by group or others."""
    try:
        info = os.lstat(folder)
    except OSError as e:
        raise SyncError(f"Expected a spool folder at {folder}, but it cannot be read ({e.strerror})") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise SyncError(f"Expected {folder} to be a spool folder, but it is a symlink or not a directory: "
                        "a spool is read only where its owner wrote it")
    if info.st_uid != os.geteuid():
        raise SyncError(f"Expected spool folder {folder} to be owned by user {os.geteuid()}, but its owner is "
                        f"{info.st_uid}: a spool is read only by the user who wrote it")
    if info.st_mode & 0o022:
        raise SyncError(f"Expected spool folder {folder} to be writable by its owner only, but its mode is "
                        f"{stat.S_IMODE(info.st_mode):o}: anyone could have written its journal (chmod 700 it once "
                        "you have checked it)")


def private_dir(folder: Path) -> None:
    """Make `folder` (and missing parents) readable by its owner only: a spool holds a run's
    values, artifacts and model, and `sync` trusts only what its owner wrote. A folder that
    was there already is checked first, not made private: one someone else could write may
    hold a journal they wrote (PermissionError, one line)."""
    if folder.exists() or folder.is_symlink():
        try:
            check_folder(folder)
        except SyncError as e:
            raise PermissionError(str(e)) from None
        return
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask


def read_meta(folder: Path) -> dict:
    """run.json, checked: {"run_id": 32 hex, "tracking_uri": str, ...}."""
    import json

    path = folder / RUN_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SyncError(f"Expected {path} to be JSON naming a run and its store, but it is not ({e})") from None
    if not isinstance(meta, dict):
        raise SyncError(f"Expected {path} to be a JSON object naming a run and its store, but it is a "
                        f"{type(meta).__name__}")
    run_id, uri = meta.get("run_id"), meta.get("tracking_uri")
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise SyncError(f"Expected field run_id of {path} to be a run id (32 hex characters), but got {run_id!r}")
    if not isinstance(uri, str) or not uri:
        raise SyncError(f"Expected field tracking_uri of {path} to be a tracking URI, but got {uri!r}")
    return meta


def inside(folder: Path, relative, where: str, field: str, kind: str = "any") -> Path:
    """`folder / relative`, refused unless it is a relative path that stays inside `folder`
    once symlinks are resolved; `kind`: "file" or "dir" must exist as such."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise SyncError(f"Expected field {field} of {where} to name a path in the spool, but got {relative!r}")
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise SyncError(f"Expected field {field} of {where} to name a path inside {folder}, but it is {relative!r}: "
                        "refused, nothing was sent")
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise SyncError(f"Expected field {field} of {where} to name a path inside {folder}, but {relative!r} leads "
                        f"out of it (to {path.resolve()}): refused, nothing was sent")
    exists = {"file": path.is_file, "dir": path.is_dir}.get(kind, lambda: True)()
    if not exists:
        raise SyncError(f"Expected field {field} of {where} to name a {kind} in the spool, but {path} is missing")
    return path


def run_path(path, where: str, field: str = "path") -> str:
    """An artifact's path in the run: relative, posix, no `..` (it must land in the run)."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path \
            or ".." in posixpath.normpath(path).split("/") or path != posixpath.normpath(path):
        raise SyncError(f"Expected field {field} of {where} to be a relative artifact path in the run, but got "
                        f"{path!r}: refused, nothing was sent")
    return path


def _strings(entry: dict, field: str, where: str) -> None:
    value = entry.get(field)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SyncError(f"Expected field {field} of {where} to map names to strings, but got {str(value)[:80]}")


def _metrics(entry: dict, where: str) -> None:
    keys = entry.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise SyncError(f"Expected field keys of {where} to map metric names to arrays, but got {str(keys)[:80]}")
    for key, parts in keys.items():
        lengths = set()
        for part in ("steps", "values", "ts"):
            field = f"keys.{key}.{part}"
            raw = parts.get(part) if isinstance(parts, dict) else None
            try:
                data = base64.b64decode(raw, validate=True) if isinstance(raw, str) else None
            except (binascii.Error, ValueError):
                data = None
            if data is None or len(data) % 8:
                raise SyncError(f"Expected field {field} of {where} to be base64 of 8-byte numbers, but it does not "
                                "decode: refused, nothing was sent")
            lengths.add(len(data))
        if len(lengths) != 1:
            raise SyncError(f"Expected fields keys.{key}.steps, values and ts of {where} to be as long as each "
                            "other, but they are not: refused, nothing was sent")


def check_entries(folder: Path, entries: list[dict], known: set[str]) -> None:
    """Every entry of the journal checked (see the module's docstring) before any is sent.
    A file journaled again at the same run path (a checkpoint an epoch) replaced the earlier
    one, whose files are gone: only the last is sent, so only the last is checked."""
    last = {}
    for number, entry in enumerate(entries, 1):
        where = f"{folder / JOURNAL} line {number}"
        if not isinstance(entry, dict):
            raise SyncError(f"Expected {where} to be a journal entry (an object), but it is a "
                            f"{type(entry).__name__}")
        op = entry.get("op")
        if op not in known:
            raise SyncError(f"Expected field op of {where} to be an op this clr_mlflow knows, but got {op!r}")
        if op in ("artifact", "table"):
            last[(op, run_path(entry.get("path"), where))] = number
    for number, entry in enumerate(entries, 1):
        where, op = f"{folder / JOURNAL} line {number}", entry["op"]
        if op in ("artifact", "table") and last[(op, entry["path"])] != number:
            continue  # replaced by a later one: never sent
        if op in ("artifact", "table"):
            inside(folder, entry.get("files"), where, "files", "dir")
            if not isinstance(entry.get("file"), str) or "/" in entry["file"]:
                raise SyncError(f"Expected field file of {where} to be a file name, but got {entry.get('file')!r}")
            inside(folder, f"{entry['files']}/{entry['file']}", where, "file", "file")
            run_path(entry.get("path"), where)
        elif op == "model":
            inside(folder, entry.get("files"), where, "files", "dir")
            model = inside(folder, f"{entry['files']}/model/MLmodel", where, "files", "file").parent
            for path in sorted(model.rglob("*")):  # every file uploaded, none leading out
                inside(folder, str(path.relative_to(folder)), where, "files")
        elif op == "metrics":
            _metrics(entry, where)
        elif op in ("params", "tags"):
            _strings(entry, op, where)
        elif op == "status":
            if entry.get("status") not in STATUSES:
                raise SyncError(f"Expected field status of {where} to be one of {', '.join(STATUSES)}, but got "
                                f"{entry.get('status')!r}")
            if entry.get("end_time") is not None and (not isinstance(entry["end_time"], int)
                                                      or isinstance(entry["end_time"], bool)):
                raise SyncError(f"Expected field end_time of {where} to be milliseconds since 1970, but got "
                                f"{entry['end_time']!r}")
        elif op == "inputs":
            for field in ("source", "name", "digest", "context"):
                if not isinstance(entry.get(field), str):
                    raise SyncError(f"Expected field {field} of {where} to be a string, but got {entry.get(field)!r}")
            _strings(entry, "tags", where)
