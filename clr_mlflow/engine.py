"""What the range test and training share: the device, the optimizer, one training step,
evaluation, state snapshots, and the sink through which the loops report.

The loops keep per-iteration losses on the device and copy them to the host in chunks,
so a CUDA run does not wait for the GPU every iteration.
"""
from __future__ import annotations

import contextlib
import copy
import random
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batches import Batches


class Sink(Protocol):
    """Where the loops report, as parallel arrays keyed by metric name: `series` for
    per-iteration values (a sink may thin them), `points` for sparse ones (evaluations,
    epochs), kept whole."""

    def series(self, steps: np.ndarray, values: dict[str, np.ndarray]) -> None: ...

    def points(self, steps: np.ndarray, values: dict[str, np.ndarray]) -> None: ...


class NullSink:
    def series(self, steps, values) -> None:
        pass

    def points(self, steps, values) -> None:
        pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_fast_kernels(device: torch.device) -> None:
    """On CUDA: let cuDNN time its convolution algorithms for our fixed shapes once and keep
    the fastest (cudnn.benchmark), and run fp32 matmuls on TF32 tensor cores. bf16 autocast
    covers most of the work already; this covers the rest. GPU runs are not bit-for-bit
    repeatable either way (cuDNN's backward kernels use atomics)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float, nesterov: bool,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                           nesterov=nesterov and momentum > 0, weight_decay=weight_decay)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """One optimizer step; returns the loss and the number of correct predictions as
    device tensors (no host sync)."""
    with autocast(x.device):
        out = model(x)
        loss = F.cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach().float(), (out.argmax(1) == y).sum()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """Mean loss and accuracy over every held-out item."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device, dtype=torch.long)
    for x, y in batches.ordered():
        with autocast(x.device):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = len(batches.y)
    return loss_sum.item() / n, correct.item() / n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class Snapshot:
    """Model weights and buffers, optimizer state, the data order and every RNG, to put back
    exactly as they were (bit for bit) after the range test."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *batches: Batches):
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optim_state = copy.deepcopy(optimizer.state_dict())
        self.training = model.training
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        self.data_rng = [b.generator.get_state() for b in batches]

    def restore(self) -> None:
        self.model.load_state_dict(self.weights)
        self.model.train(self.training)
        self.optimizer.load_state_dict(self.optim_state)
        py, np_state, cpu, cuda = self.rng
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for b, state in zip(self.batches, self.data_rng):
            b.generator.set_state(state)
