"""A spool's journal (tracking layer, local): the file format and how it is written.

`journal.jsonl` holds one op a line, append-only; metric chunks are base64 of little-endian
arrays (exact, NaN-safe, and ~20x cheaper than JSON floats). It is written through a
shared memory map (`MappedJournal`) and read back by `read_journal`, which ignores a line
a SIGKILL cut short. spool.py owns the folder around it.
"""
from __future__ import annotations

import base64
import errno
import json
import mmap
import os
from pathlib import Path

import numpy as np

from clr_mlflow.tracking.spool_check import JOURNAL, SyncError


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


# The journal file ------------------------------------------------------------------------

def reserve_blocks(fd: int, size: int) -> None:
    """Blocks reserved now: a full disk is an OSError here, not a SIGBUS when a mapped page
    is written. macOS has no posix_fallocate, and ZFS / some NFS refuse it: a plain resize."""
    try:
        os.posix_fallocate(fd, 0, size)
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


class MappedJournal:
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
        """Room for `need` more bytes: a generous step, else (a nearly full disk) just what
        is needed; the old map stays usable when there is no room at all (OSError)."""
        want = max(self.end + need, 4096)
        for size in sorted({max(1 << 20, 2 * self.size, want), want + (64 << 10), want}, reverse=True):
            try:
                reserve_blocks(self.fd, size)
                break
            except OSError as e:
                if e.errno != errno.ENOSPC or size == want:
                    raise
        if self.map is not None:
            self.map.close()
        self.size = size
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
