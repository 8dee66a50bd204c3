"""One candidate of `tune_bounds` trained: what every candidate trains with (`Setup`, pickled
to Ray's workers as it is), how it ended (`Outcome`), and the caller's RNGs and data order
kept out of it."""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from clr_mlflow.core.checks import need
from clr_mlflow.core.engine import data_generator, seed_everything
from clr_mlflow.core.schedules import clr_scheduler
from clr_mlflow.core.steps import CrossEntropy, LossFn, Stepper, classification_eval, metric_eval, model_device
from clr_mlflow.core.training import TrainingDiverged, train


@dataclass(frozen=True)
class Setup:
    """What every candidate trains with (pickled to Ray's workers as it is)."""

    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    loader: Iterable
    val_loader: Iterable
    policy: str
    steps: int
    loss_fn: LossFn | None = None
    metric_fn: Callable[[nn.Module, Iterable], float] | None = None
    device: torch.device | None = None
    amp: torch.dtype | None = None
    progress: bool = False
    data_states: tuple = field(default=())  # the loaders' generators as tuning began


@dataclass
class Outcome:
    """One (bounds, seed) trained: the final metric, how it ended, its series."""

    metric: float = float("nan")
    outcome: str = "finished"
    error: str = ""
    epochs: list[dict] = field(default_factory=list)  # step, val_accuracy (the metric), val_loss
    lrs: np.ndarray | None = None
    losses: np.ndarray | None = None


def _generators(setup: Setup) -> list[torch.Generator | None]:
    return [data_generator(setup.loader), data_generator(setup.val_loader)]


def _build(setup: Setup) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = setup.make_model()
    need(isinstance(model, nn.Module), "make_model", "a callable returning a torch.nn.Module as", type(model).__name__)
    optimizer = setup.make_optimizer(model)
    need(isinstance(optimizer, torch.optim.Optimizer), "make_optimizer",
         "a callable(model) returning a torch.optim.Optimizer as", type(optimizer).__name__)
    return model, optimizer


def train_candidate(setup: Setup, base_lr: float, max_lr: float, seed: int, on_epoch=None) -> Outcome:
    """Train fresh `make_model()` weights (seeded with `seed`, the data in the order tuning
    began with) for `steps` optimizer steps under `policy` between the bounds (a cyclic
    policy makes one cycle of them), then return the validation metric (default: accuracy)."""
    seed_everything(seed)
    for g, state in zip(_generators(setup), setup.data_states):
        if g is not None and state is not None:
            g.set_state(state)
    model, optimizer = _build(setup)
    device = setup.device or model_device(model)
    stepper = Stepper(model, optimizer, setup.loss_fn or CrossEntropy(), device, amp=setup.amp)
    scheduler = clr_scheduler(optimizer, setup.policy, base_lr, max_lr, step_size=max(1, setup.steps // 2),
                              total_iters=setup.steps)
    evaluator = metric_eval(setup.metric_fn) if setup.metric_fn is not None else classification_eval(device, setup.amp)
    out = Outcome()
    try:
        result = train(stepper, scheduler, setup.loader, setup.steps, val_loader=setup.val_loader,
                       evaluator=evaluator, progress=setup.progress, on_epoch=on_epoch)
    except TrainingDiverged as e:
        return Outcome(outcome="diverged", error=str(e))
    out.epochs = result.epochs[["step", "val_accuracy", "val_loss"]].to_dict("records")
    out.metric, out.lrs, out.losses = result.final_accuracy, result.lrs, result.losses
    return out


@contextmanager
def _callers_state(setup: Setup):
    """Every RNG and the loaders' data order put back as they were, whatever ran inside."""
    rngs = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    data = [(g, g.get_state()) for g in _generators(setup) if g is not None]
    try:
        yield
    finally:
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.set_rng_state(rngs[2])
        if rngs[3] is not None:
            torch.cuda.set_rng_state_all(rngs[3])
        for g, state in data:
            g.set_state(state)


def _outcome(got: list[Outcome]) -> str:
    """A candidate's outcome over its seeds: finished only when every seed gave a metric."""
    if not got:
        return "no bounds"
    worse = sorted({o.outcome for o in got} - {"finished"})
    if worse:
        return ",".join(worse)
    return "finished" if all(math.isfinite(o.metric) for o in got) else "no metric (NaN)"
