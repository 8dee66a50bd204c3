"""Training state as a file a later process can continue from, bit for bit on the CPU.

Only tensors and plain containers go in (numpy arrays and RNG states are converted), so it
loads with `torch.load(..., weights_only=True)`: a checkpoint downloaded from a tracking
server cannot run code on the machine that resumes it.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from clr_mlflow.core.engine import data_generator

FORMAT = 1
FILE = "checkpoint.pt"
ARTIFACT_DIR = "train"  # the run's artifact train/checkpoint.pt


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: one line saying why."""


def rng_state(loader) -> dict:
    """Every random number generator the training draws from: Python's, NumPy's, torch's
    (CPU and each CUDA device) and the loader's own generator (data order, augmentation)."""
    np_state = np.random.get_state(legacy=False)
    generator = data_generator(loader)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict, loader) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                               "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = data_generator(loader)
    if generator is not None and state["loader"] is not None:
        generator.set_state(state["loader"])


def _as_tuples(x):
    """random.setstate wants the tuples it gave (pickling keeps them; this is for safety)."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def plain(x):
    """`x` with NumPy scalars (an lr the schedule computed, a smoothed loss) made Python
    numbers: weights_only loading accepts tensors and plain values only."""
    if isinstance(x, dict):
        return type(x)((k, plain(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(plain(v) for v in x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return to_tensor(x)
    return x


def save(state: dict, path: Path) -> Path:
    """Write `state` to `path` through a temporary file renamed into place, so a reader (or
    a crash half way) never sees half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(plain({"format": FORMAT, **state}), tmp)
    os.replace(tmp, path)
    return path


def load(path: Path) -> dict:
    """A checkpoint written by `save`; CheckpointError when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torn file, foreign pickle, not a torch file
        raise CheckpointError(f"Expected {path} to be a clr_mlflow checkpoint, but it cannot be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"Expected {path} to be a clr_mlflow checkpoint of format {FORMAT}, but it is not")
    return state
