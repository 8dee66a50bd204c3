"""Several range tests of one setting, from different initialisations and data orders,
and how much their bounds agree: a suggestion read off one curve can move tenfold with
the seed, so the table gives the median and the spread.

Seed 0 is the model as given; seed k > 0 re-initialises every module that has
`reset_parameters()` under `torch.manual_seed(base + k)` and re-seeds the loader's data
order (base: the seed torch was last given). Meant for models trained from scratch.

The seeds run one after another, or side by side as one batched model (batched.py, chosen
by lr_find) from the same starts (`seed_starts`): the same curves up to float rounding.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clr_mlflow.core.bounds import spread_frame
from clr_mlflow.core.engine import Sink, Snapshot, data_generator
from clr_mlflow.core.range_test import RangeTestResult


def reseed(model: nn.Module, loader: Iterable, seed: int) -> None:
    """New initial weights and a new data order, both from `seed`."""
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    generator = data_generator(loader)
    if generator is not None:
        generator.manual_seed(seed)


class SeedSink:
    """What seed k's loop reports: seed 0 keeps the usual series; every seed's smoothed
    loss also goes to `<prefix>seed<k>/smoothed_loss`."""

    def __init__(self, sink: Sink, seed: int, prefix: str):
        self.sink, self.seed, self.prefix = sink, seed, prefix

    def series(self, steps, values: dict) -> None:
        out = {f"{self.prefix}seed{self.seed}/smoothed_loss": values[self.prefix + "smoothed_loss"]}
        self.sink.series(steps, (values | out) if self.seed == 0 else out)

    def points(self, steps, values: dict) -> None:
        if self.seed == 0:
            self.sink.points(steps, values)


@dataclass
class SeedStart:
    """Where seed k's test starts in run_seeds: its weights (parameters and buffers by name)
    and the states of the RNGs that order and augment its data."""

    weights: dict[str, torch.Tensor]
    rngs: tuple                       # torch's CPU RNG, Python's and NumPy's (as Snapshot keeps them)
    data: torch.Tensor | None         # the loader's own generator, if it has one


def seed_starts(model: nn.Module, loader: Iterable, seeds: int, base: int) -> list[SeedStart]:
    """Every seed's start as the one-after-another run makes it: seed 0 the state as given,
    seed k > 0 after reseed(base + k) (each test restores the state as given before the next
    reseed, so seed k's start does not depend on seeds before it). Leaves seed K-1's weights
    in the model: the caller restores."""
    generator = data_generator(loader)
    starts = []
    for k in range(seeds):
        if k:
            reseed(model, loader, base + k)
        weights = {n: t.detach().clone() for n, t in itertools.chain(model.named_parameters(),
                                                                     model.named_buffers())}
        starts.append(SeedStart(weights, (torch.get_rng_state(), random.getstate(), np.random.get_state()),
                                generator.get_state() if generator is not None else None))
    return starts


RunAll = Callable[[list[SeedStart], list[Sink]], "list[RangeTestResult] | None"]


def run_seeds(run_one: Callable[[Sink], RangeTestResult], model: nn.Module, optimizer: torch.optim.Optimizer,
              loaders: list[Iterable], seeds: int, sink: Sink, prefix: str, scaler=None,
              run_all: RunAll | None = None) -> list[RangeTestResult]:
    """`run_one(sink)` once per seed; the model, optimizer, data order and RNGs are put
    back as they were before seed 0 afterwards. `run_all(starts, sinks)`, when given, runs
    every seed at once from the same starts (batched.py) instead, or returns None when it
    could not start (then the seeds run one after another, from the state as given)."""
    if seeds == 1:
        return [run_one(sink)]
    base = torch.initial_seed()
    outer = Snapshot(model, optimizer, *loaders, scaler=scaler)
    sinks: list[Sink] = [SeedSink(sink, k, prefix) for k in range(seeds)]
    try:
        results = None
        if run_all is not None:
            results = run_all(seed_starts(model, loaders[0], seeds, base), sinks)
            outer.restore()
        if results is None:
            results = []
            for k in range(seeds):
                if k:
                    reseed(model, loaders[0], base + k)
                results.append(run_one(sinks[k]))
    finally:
        outer.restore()
    return [dataclasses.replace(r, seed=k) for k, r in enumerate(results)]


def combine(results: list[RangeTestResult], rule: str, divisor: float) -> RangeTestResult:
    """Seed 0's result carrying every seed's result and the bounds table over all seeds."""
    tables = [r.with_bounds(rule, divisor).bounds for r in results]
    return dataclasses.replace(results[0], bounds=spread_frame(tables), bounds_rule=rule,
                               seed_results=tuple(results))
