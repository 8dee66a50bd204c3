"""Several seeds' range tests side by side in one batched model, for small models on CUDA
whose steps are too short to keep the GPU busy (most of such a step is Python and
kernel-launch overhead, paid once per step here instead of once per seed).

The K seeds' weights are stacked into (K, ...) tensors; `torch.func.vmap` of
`functional_call` runs the model once per step on K batches (one per seed, each from its
own pass over the loader: `SeedStreams`), and one optimizer steps the stacked tensors.
SGD, Adam and AdamW update every element on its own, so one optimizer over stacked tensors
is K optimizers (momentum, weight decay, Adam's moments included; they share the lr and
the step count, as the K tests do). The loop is range_test.range_tests, with one curve per
seed; the results equal the one-after-another run's (seeds.run_seeds) up to float rounding
(batched kernels sum in another order).

Not batched (lr_find runs the seeds one after another; `batched_seeds=True` says why):
held-out evaluation, a GradScaler, other optimizers, a one-shot iterator as loader, and,
found at the first step, whatever vmap cannot run: a loss dict, random ops in the forward
(dropout: vmap would draw other numbers than the model alone), `.item()` or data-dependent
Python control flow. BatchNorm in training mode is fine: it normalises with batch
statistics, and each seed's running statistics are updated in its own slice.

lr_find batches on its own (`batched_seeds=None`) on CUDA only. On the CPU it is slower
(scripts/bench_seeds.py, 2 cores: 4 seeds of the small CNN 0.28x, of a tiny MLP 0.66x the
speed of one after another: vmap's grouped convolutions leave strided tensors that the
CPU kernels copy, and its per-op dispatch costs more than a tiny model's arithmetic), and
CPU runs are repeatable bit for bit, seed 0 of K equal to the model run alone, which
another summation order would break. `batched_seeds=True` batches on the CPU anyway.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from clr_mlflow.core.engine import Sink, data_generator
from clr_mlflow.core.range_test import RangeTestResult, range_tests
from clr_mlflow.core.seeds import RunAll, SeedStart
from clr_mlflow.core.steps import CrossEntropy, LossFn, autocast, cycle, inputs_and_targets, to_device

log = logging.getLogger(__name__)

# Auto mode batches models up to this size: above it one seed's step is big enough to use
# the device on its own, and K copies of weights, gradients and optimizer state cost memory.
MAX_PARAMS = 5_000_000
OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)  # elementwise updates


def unsupported(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable, *, scaler=None,
                val_loader: Iterable | None = None, auto: bool = False,
                device: torch.device = torch.device("cpu")) -> str | None:
    """Why the seeds cannot (or, with `auto`, should not) run batched, as words for an error
    message, or None."""
    if type(optimizer) not in OPTIMIZERS:
        return f"optimizer {type(optimizer).__name__} (batched: SGD, Adam or AdamW, whose update is elementwise)"
    if scaler is not None:
        return "a GradScaler (its skipped steps would be one seed's, not all seeds')"
    if val_loader is not None:
        return "held-out evaluation (val_loader)"
    if isinstance(loader, Iterator):
        return "a one-shot iterator as loader (each seed needs its own pass)"
    own = {id(p) for p in model.parameters()}
    given = [id(p) for g in optimizer.param_groups for p in g["params"]]
    if not own.issuperset(given) or len(set(given)) != len(given):
        return "an optimizer holding tensors that are not the model's parameters"
    if not auto:
        return None
    if device.type != "cuda":
        # On the CPU batching measured slower, and CPU runs are repeatable bit for bit (seed 0
        # of K equal to the model alone), which batched kernels' rounding would break.
        return f"device {device.type} (auto mode batches on CUDA only)"
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMS:
        return f"{size:,} parameters (auto mode batches models up to {MAX_PARAMS:,})"
    return None


def runner(batched_seeds: bool | None, seeds: int, model: nn.Module, optimizer: torch.optim.Optimizer,
           loader: Iterable, loss_fn: LossFn, lrs: np.ndarray, *, scaler, val_loader, device: torch.device,
           accumulate: int = 1, amp: torch.dtype | None = None, **loop) -> RunAll | None:
    """What lr_find hands run_seeds: a batched run of the seeds, or None for one after
    another. `batched_seeds` None = auto: batched on CUDA for models up to MAX_PARAMS where
    it applies, a first step that vmap cannot run falling back; True = batched on any device,
    or a ValueError saying why not (before anything runs); False = never."""
    if seeds == 1 or batched_seeds is False:
        return None
    why = unsupported(model, optimizer, loader, scaler=scaler, val_loader=val_loader, auto=batched_seeds is None,
                      device=device)
    if why is not None:
        if batched_seeds:
            raise ValueError(f"Expected batched_seeds=None or False with {why}, but got batched_seeds=True")
        return None

    def run_all(starts: list[SeedStart], sinks: list[Sink]) -> list[RangeTestResult] | None:
        stepper = None
        try:
            stepper = BatchedStepper(model, optimizer, loss_fn, device, [s.weights for s in starts], accumulate, amp)
            return range_tests(stepper, SeedStreams(loader, starts), lrs, accumulate=accumulate, sinks=sinks, **loop)
        except Exception as error:  # noqa: BLE001 - any failure before the first step is done means "cannot batch"
            if batched_seeds or (stepper is not None and stepper.steps):
                raise
            log.info("range test seeds run one after another: the batched step failed (%s: %s)",
                     type(error).__name__, error)
            return None

    return run_all


def _cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss without CrossEntropy's accuracy count, which would keep a tensor of
    vmap's past the call (the range test never reads it)."""
    x, y = inputs_and_targets(batch)
    return nn.functional.cross_entropy(model(x), y)


class _Loss(nn.Module):
    """`loss_fn(model, batch)` as a module's forward, so that functional_call can put one
    seed's slice of the stacked weights into the user's model (which loss_fn may use in any
    way, not just call) for the length of the call."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = [loss_fn]  # in a list: a loss that is itself a module stays out of our state

    def forward(self, batch: Any) -> torch.Tensor:
        loss = self.loss_fn[0](self.model, batch)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise TypeError(f"Expected loss_fn to return one scalar tensor for batched seeds, but got "
                            f"{type(loss).__name__}")
        return loss.reshape(())


def stack_batches(batches: Sequence[Any]) -> Any:
    """K batches of one structure as one, each tensor stacked on a new first dimension."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(batches))
    if isinstance(first, Mapping):
        return {k: stack_batches([b[k] for b in batches]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(stack_batches(v) for v in zip(*batches)))
    if isinstance(first, (list, tuple)):
        return type(first)(stack_batches(v) for v in zip(*batches))
    raise TypeError(f"Expected batches of tensors in tuples, lists or dicts for batched seeds, but got "
                    f"{type(first).__name__}")


def _stacked_state(value: Any, key: str, param: torch.Tensor, k: int) -> Any:
    """One optimizer state entry for the stacked parameter: per-element state (momentum,
    Adam's moments) repeated for every seed; the step count shared (all seeds step together)."""
    if not isinstance(value, torch.Tensor):
        return value
    if key != "step" and value.shape == param.shape:
        return value.detach().unsqueeze(0).repeat(k, *([1] * value.dim()))
    return value.detach().clone()


class BatchedStepper:
    """Stepper's contract for K seeds: `step(micro_batches)` gets per micro-batch a tuple of
    K batches and returns the K losses. The user's model lends its modules (and training
    mode); the weights are the stacked copies, and the optimizer a twin of the user's over
    them (same class, param groups and hyperparameters, its state repeated per seed)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, device: torch.device,
                 weights: list[dict[str, torch.Tensor]], accumulate: int = 1, amp: torch.dtype | None = None):
        self.model, self.device, self.accumulate, self.amp = model, device, accumulate, amp
        self.scaler = None
        self.steps = 0
        k = len(weights)
        self.net = _Loss(model, _cross_entropy if isinstance(loss_fn, CrossEntropy) else loss_fn)
        named = dict(model.named_parameters())
        self.params = {"model." + n: torch.stack([w[n] for w in weights]).requires_grad_(p.requires_grad)
                       for n, p in named.items()}
        self.buffers = {"model." + n: torch.stack([w[n] for w in weights]) for n, _ in model.named_buffers()}
        stacked = {id(p): self.params["model." + n] for n, p in named.items()}
        groups = [{key: v for key, v in g.items() if key != "params"}
                  | {"params": [stacked[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
        self.optimizer = type(optimizer)(groups)
        for group, twin in zip(optimizer.param_groups, self.optimizer.param_groups):
            for p, q in zip(group["params"], twin["params"]):
                if optimizer.state.get(p):
                    self.optimizer.state[q] = {key: _stacked_state(v, key, p, k)
                                               for key, v in optimizer.state[p].items()}
        # randomness="error": a forward that draws random numbers fails at the first step
        # (and lr_find falls back) instead of giving curves the seeds alone would not give.
        self.losses = vmap(lambda params, buffers, batch: functional_call(self.net, (params, buffers), (batch,)),
                           randomness="error")

    def step(self, micro_batches: Sequence[tuple]) -> tuple[torch.Tensor, dict, bool]:
        """(the K mean losses, no terms, not skipped): Stepper.step's arithmetic per seed."""
        self.optimizer.zero_grad(set_to_none=True)
        n, loss_sum = len(micro_batches), None
        for seeds_batches in micro_batches:
            batch = stack_batches([to_device(b, self.device) for b in seeds_batches])
            with autocast(self.device, self.amp):
                losses = self.losses(self.params, self.buffers, batch)
            # Summing independent losses gives each seed's slice exactly its own gradient.
            (losses / n if n > 1 else losses).sum().backward()
            losses = losses.detach().float()
            loss_sum = losses if loss_sum is None else loss_sum + losses
        self.optimizer.step()
        self.steps += 1
        return (loss_sum / n if n > 1 else loss_sum), {}, False


class SeedStreams:
    """K passes over one loader side by side, a tuple of K batches per item: seed k's batches
    are those its own run would draw. Before each of them, the RNGs that order and augment
    data (the loader's generator, torch's, Python's and NumPy's) are set to seed k's states,
    and read back after; nothing else draws from them in the batched loop."""

    def __init__(self, loader: Iterable, starts: list[SeedStart]):
        self.loader, self.generator = loader, data_generator(loader)
        self.starts = starts

    def __iter__(self) -> Iterator[tuple]:
        streams = [cycle(self.loader) for _ in self.starts]
        states = [(s.rngs, s.data) for s in self.starts]
        while True:
            batches = []
            for k, stream in enumerate(streams):
                (cpu, py, np_state), data = states[k]
                torch.set_rng_state(cpu)
                random.setstate(py)
                np.random.set_state(np_state)
                if self.generator is not None:
                    self.generator.set_state(data)
                batches.append(next(stream))
                states[k] = ((torch.get_rng_state(), random.getstate(), np.random.get_state()),
                             self.generator.get_state() if self.generator is not None else None)
            yield tuple(batches)
