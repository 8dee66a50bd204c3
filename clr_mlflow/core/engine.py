"""What the range test and training share: the device, the optimizer, state snapshots,
and the sink through which the loops report (the step itself is in steps.py).

The loops keep per-iteration losses on the device and copy them to the host in chunks,
so a CUDA run does not wait for the GPU every iteration.
"""
from __future__ import annotations

import copy
import random
from typing import Protocol

import numpy as np
import torch
from torch import nn


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
                   weight_decay: float, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov when asked and momentum > 0) or AdamW. `groups`: param groups as
    `{"params", "lr_mult", "weight_decay"}`; each starts at lr x lr_mult, and the range test
    and schedules keep that ratio."""
    params = model.parameters() if groups is None else [
        {"params": g["params"], "lr": lr * g["lr_mult"], "weight_decay": g["weight_decay"]} for g in groups]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def data_generator(loader) -> torch.Generator | None:
    """The torch.Generator that orders a loader's data (ours and DataLoader keep one in
    `.generator`; a DataLoader without one draws from torch's global RNG, saved anyway)."""
    g = getattr(loader, "generator", None)
    return g if isinstance(g, torch.Generator) else None


def module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule's `training` flag: a user may have put some in eval() (a frozen
    BatchNorm when fine-tuning), which `model.train(flag)` would overwrite."""
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


class Snapshot:
    """Model weights and buffers, every submodule's train/eval mode, every parameter's
    `.grad` (None stays None), optimizer state, the loaders' data order, every RNG and a
    GradScaler's scale, to put back exactly as they were (bit for bit) after the range test."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *loaders, scaler=None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.scaler_state = scaler.state_dict() if scaler is not None else None
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optim_state = copy.deepcopy(optimizer.state_dict())
        self.modes = module_modes(model)
        params = {id(p): p for p in model.parameters()}
        params.update({id(p): p for g in optimizer.param_groups for p in g["params"]})
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params.values()]
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        self.data_rng = [(g, g.get_state()) for g in map(data_generator, loaders) if g is not None]

    def restore(self) -> None:
        self.model.load_state_dict(self.weights)
        restore_modes(self.modes)
        for p, grad in self.grads:
            p.grad = grad
        self.optimizer.load_state_dict(self.optim_state)
        py, np_state, cpu, cuda = self.rng
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for g, state in self.data_rng:
            g.set_state(state)
        if self.scaler is not None:
            self.scaler.load_state_dict(self.scaler_state)
