"""Learning-rate policies as pure functions of the iteration, and one LRScheduler around them.

Every policy answers `height(t)`: how far the lr is from base_lr towards max_lr at
iteration t (0 = base, 1 = max; one_cycle's final anneal goes below 0). The lr is
`base_lr + (max_lr - base_lr) * height(t)`, and cycled momentum moves the other way.
Frozen dataclasses (lambdas would not pickle); `ScheduleLR.state_dict()` holds a schedule
as a plain dict (`Schedule.to_dict`), so it loads with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from clr_mlflow.core.checks import is_finite, is_int, need

POLICIES = ("triangular", "triangular2", "exp_range", "one_cycle", "fixed")
CLR_MODES = ("triangular", "triangular2", "exp_range")


@dataclass(frozen=True)
class Schedule:
    base_lr: float
    max_lr: float

    def height(self, t: int) -> float:
        raise NotImplementedError

    def lr(self, t: int) -> float:
        return self.base_lr + (self.max_lr - self.base_lr) * self.height(t)

    def lrs(self, num_iters: int) -> np.ndarray:
        return np.array([self.lr(t) for t in range(num_iters)])

    def to_dict(self) -> dict:
        """Plain values only (the class name and each field as a Python number or string):
        what `ScheduleLR.state_dict()` stores, and what `from_dict` takes back."""
        return {"type": type(self).__name__} | {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @staticmethod
    def from_dict(state: dict) -> Schedule:
        kind = SCHEDULES.get(state.get("type")) if isinstance(state, dict) else None
        if kind is None:
            raise ValueError(f"Expected a schedule dict with type in {', '.join(SCHEDULES)}, but got {state!r}")
        return kind(**{k: v for k, v in state.items() if k != "type"})


def _plain(value):
    """A NumPy scalar or one-element tensor as the Python number it holds."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (int, float, str)) else value


@dataclass(frozen=True)
class CyclicLR(Schedule):
    """Smith (2017), per iteration t with half-cycle `step_size`:
    cycle = floor(1 + t / (2 step_size)), x = |t / step_size - 2 cycle + 1|,
    height = max(0, 1 - x) * scale with scale 1 (triangular), 1 / 2**(cycle - 1)
    (triangular2) or gamma**t (exp_range, global t).
    """

    step_size: int = 2000
    mode: str = "triangular"
    gamma: float = 1.0

    def height(self, t: int) -> float:
        cycle = math.floor(1 + t / (2 * self.step_size))
        x = abs(t / self.step_size - 2 * cycle + 1)
        if self.mode == "triangular":
            scale = 1.0
        elif self.mode == "triangular2":
            scale = 1.0 / 2.0 ** (cycle - 1)
        else:  # exp_range
            scale = self.gamma**t
        return max(0.0, 1.0 - x) * scale


@dataclass(frozen=True)
class OneCycle(Schedule):
    """One cycle over `total_iters` (Smith 2018): lr rises linearly from base_lr to max_lr
    over the first (1 - anneal_frac) / 2 of training, falls back to base_lr over the same
    length, then anneals linearly over the last `anneal_frac` down to base_lr / anneal_div.
    """

    total_iters: int = 1
    anneal_frac: float = 0.1
    anneal_div: float = 100.0

    def height(self, t: int) -> float:
        half = (1.0 - self.anneal_frac) * self.total_iters / 2.0
        if t <= half:
            return t / half
        if t <= 2 * half:
            return (2 * half - t) / half
        tail = self.total_iters - 1 - 2 * half
        frac = min(1.0, (t - 2 * half) / tail) if tail > 0 else 1.0
        final = self.base_lr / self.anneal_div
        # Expressed as a height so lr() stays the one formula: below 0 means below base_lr.
        return -frac * (self.base_lr - final) / (self.max_lr - self.base_lr)


@dataclass(frozen=True)
class Fixed(Schedule):
    """The paper's baseline: a constant lr equal to base_lr."""

    def height(self, t: int) -> float:
        return 0.0


SCHEDULES = {kind.__name__: kind for kind in (CyclicLR, OneCycle, Fixed)}


def make_schedule(
    policy: str,
    base_lr: float,
    max_lr: float,
    step_size: int,
    total_iters: int,
    gamma: float = 1.0,
    anneal_frac: float = 0.1,
    anneal_div: float = 100.0,
) -> Schedule:
    if policy in CLR_MODES:
        return CyclicLR(base_lr, max_lr, step_size=step_size, mode=policy, gamma=gamma)
    if policy == "one_cycle":
        return OneCycle(base_lr, max_lr, total_iters, anneal_frac, anneal_div)
    if policy == "fixed":
        return Fixed(base_lr, max_lr)
    raise ValueError(f"Expected policy in {POLICIES}, but got {policy!r}")


def set_momentum(group: dict, value: float) -> None:
    """SGD's `momentum`, or beta1 for Adam-style optimizers."""
    if "betas" in group:
        group["betas"] = (value, group["betas"][1])
    else:
        group["momentum"] = value


class ScheduleLR(LRScheduler):
    """Drives every param group's lr from a `Schedule`, one `step()` per iteration.

    What `clr_scheduler` returns (build it there: that call checks every argument). A torch
    `LRScheduler`: `get_last_lr()`, `state_dict()`, `load_state_dict()` and pickling work.
    Group 0 runs at the schedule's lr; every other group keeps its starting ratio to group 0.

    Args:
        optimizer: Any torch optimizer.
        schedule: The policy: the lr (and the momentum's position) at every iteration.
        momentum: `(low, high)`: the momentum (beta1 for AdamW) cycles opposite to the lr,
            `high` when the lr is at base_lr, `low` at max_lr. None leaves it alone.
        last_epoch: torch's position argument: the iteration to resume from, -1 to start.

    Examples:
        >>> import torch
        >>> from clr_mlflow import clr_scheduler
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> scheduler = clr_scheduler(optimizer, "triangular", 1e-3, 6e-3, step_size=2,
        ...                           cycle_momentum=True)
        >>> isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
        True
        >>> for _ in range(3):   # the lr rises, beta1 falls from max_momentum to base_momentum
        ...     print(round(scheduler.get_last_lr()[0], 6), round(optimizer.param_groups[0]["betas"][0], 6))
        ...     optimizer.step()
        ...     scheduler.step()
        0.001 0.95
        0.0035 0.9
        0.006 0.85
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Schedule,
        momentum: tuple[float, float] | None = None,
        last_epoch: int = -1,
    ):
        self.schedule = schedule
        self.momentum = momentum
        super().__init__(optimizer, last_epoch)

    def state_dict(self) -> dict:
        """torch's scheduler state with plain values only: the schedule as a dict and the
        momentum bounds as a list, so `torch.load(..., weights_only=True)` (torch's default,
        Lightning's checkpoints) reads it back.

        Returns:
            torch's `LRScheduler` state (position, last lrs...) with `schedule` (the
                policy's class name and fields) and `momentum` (`[low, high]` or None).

        Examples:
            >>> import io, torch
            >>> from clr_mlflow import clr_scheduler
            >>> optimizer = torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.1)
            >>> scheduler = clr_scheduler(optimizer, "triangular", 1e-3, 6e-3, step_size=2)
            >>> state = scheduler.state_dict()
            >>> state["schedule"]  # doctest: +NORMALIZE_WHITESPACE
            {'type': 'CyclicLR', 'base_lr': 0.001, 'max_lr': 0.006, 'step_size': 2, 'mode': 'triangular',
             'gamma': 0.99994}
            >>> buffer = io.BytesIO()
            >>> torch.save(state, buffer)
            >>> _ = buffer.seek(0)
            >>> torch.load(buffer, weights_only=True)["schedule"]["mode"]
            'triangular'
        """
        state = super().state_dict()
        state["schedule"] = self.schedule.to_dict()
        state["momentum"] = list(self.momentum) if self.momentum is not None else None
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Takes what `state_dict()` gave (a state from before, holding the Schedule
        itself, too): the schedule, momentum bounds and position all become the saved ones.

        Args:
            state_dict: What `state_dict()` returned, e.g. read back from a checkpoint.

        Raises:
            ValueError: A `schedule` dict whose `type` is no known schedule.

        Examples:
            >>> import torch
            >>> from clr_mlflow import clr_scheduler
            >>> optimizer = torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.1)
            >>> scheduler = clr_scheduler(optimizer, "triangular", 1e-3, 6e-3, step_size=2)
            >>> optimizer.step()
            >>> scheduler.step()
            >>> resumed = clr_scheduler(optimizer, "fixed", 0.1, 0.1)
            >>> resumed.load_state_dict(scheduler.state_dict())
            >>> resumed.last_epoch, type(resumed.schedule).__name__, round(resumed.get_last_lr()[0], 6)
            (1, 'CyclicLR', 0.0035)
        """
        state = dict(state_dict)
        if isinstance(state.get("schedule"), dict):
            state["schedule"] = Schedule.from_dict(state["schedule"])
        if state.get("momentum") is not None:
            state["momentum"] = tuple(state["momentum"])
        super().load_state_dict(state)

    def get_lr(self) -> list[float]:
        """The lr of every param group at the current iteration (`last_epoch`); `step()`
        calls it and sets them. Read the lrs in use with `get_last_lr()`.

        Returns:
            One lr per param group: the schedule's lr for group 0, and for group g that lr
                times group g's starting lr / group 0's.

        Examples:
            >>> import torch
            >>> from clr_mlflow import clr_scheduler
            >>> head, body = torch.nn.Linear(4, 1), torch.nn.Linear(4, 4)
            >>> optimizer = torch.optim.SGD([{"params": head.parameters(), "lr": 0.1},
            ...                              {"params": body.parameters(), "lr": 0.01}])
            >>> scheduler = clr_scheduler(optimizer, "fixed", 1e-3, 1e-3)
            >>> [round(lr, 8) for lr in scheduler.get_lr()]   # group 1 keeps its 1/10
            [0.001, 0.0001]
        """
        # Group g keeps its starting ratio to group 0 (discriminative lrs): the schedule's
        # bounds are group 0's.
        lr = self.schedule.lr(self.last_epoch)
        return [lr * (base / self.base_lrs[0]) for base in self.base_lrs]

    def step(self, epoch=None) -> None:
        """Move to the next iteration: every param group's lr from the schedule and, with
        momentum bounds, the momentum (SGD's `momentum`, or beta1 for Adam-style optimizers)
        opposite to the lr. Call it once per iteration, after `optimizer.step()`.

        Args:
            epoch: torch's deprecated explicit position, passed on to `LRScheduler.step`;
                leave it None.

        Examples:
            >>> import torch
            >>> from clr_mlflow import clr_scheduler
            >>> optimizer = torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.1, momentum=0.9)
            >>> scheduler = clr_scheduler(optimizer, "one_cycle", 0.01, 0.1, total_iters=4,
            ...                           cycle_momentum=True)
            >>> optimizer.step()
            >>> scheduler.step()
            >>> round(optimizer.param_groups[0]["lr"], 6), round(optimizer.param_groups[0]["momentum"], 6)
            (0.06, 0.894444)
        """
        super().step(epoch)
        if self.momentum is not None:
            low, high = self.momentum
            h = min(1.0, max(0.0, self.schedule.height(self.last_epoch)))
            for group in self.optimizer.param_groups:
                set_momentum(group, high - (high - low) * h)


def clr_scheduler(
    optimizer: Optimizer,
    policy: str,
    base_lr: float,
    max_lr: float,
    *,
    step_size: int | None = None,
    total_iters: int | None = None,
    gamma: float = 0.99994,
    cycle_momentum: bool = False,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    anneal_frac: float = 0.1,
    anneal_div: float = 100.0,
) -> ScheduleLR:
    """A torch LRScheduler that cycles the lr of `optimizer` (any optimizer), one `step()`
    per iteration, after the first call at `base_lr` (iteration 0).

    Checks every argument before it touches the optimizer.

    Args:
        optimizer: Any torch optimizer. Every param group other than group 0 keeps its
            starting ratio to group 0.
        policy: `triangular`, `triangular2`, `exp_range` (Smith 2017, half-cycle
            `step_size` iterations; triangular2 halves the amplitude every cycle, exp_range
            scales it by gamma**iteration), `one_cycle` (over `total_iters`, the last
            `anneal_frac` annealing to base_lr/anneal_div) or `fixed` (base_lr).
        base_lr: Param group 0's lower bound (and the lr at iteration 0), positive.
        max_lr: Param group 0's upper bound, at least `base_lr` (more than it for
            `one_cycle`).
        step_size: Half a cycle, in iterations: a positive integer, needed by
            `triangular`, `triangular2` and `exp_range`.
        total_iters: The length of `one_cycle` in iterations, at least 2; needed by it.
        gamma: exp_range's amplitude factor per iteration, in (0, 1].
        cycle_momentum: Move the momentum (Adam's beta1) opposite to the lr, between
            `base_momentum` (at max_lr) and `max_momentum` (at base_lr).
        base_momentum: The momentum at max_lr, with `cycle_momentum`.
        max_momentum: The momentum at base_lr, with `cycle_momentum`;
            0 <= base_momentum < max_momentum < 1.
        anneal_frac: The fraction of `one_cycle`'s iterations at its end that anneals from
            base_lr to base_lr/anneal_div, in [0, 1).
        anneal_div: one_cycle's final lr is base_lr/anneal_div; at least 1.

    Returns:
        The scheduler (a torch `LRScheduler`): call `step()` once per iteration;
            `state_dict()`, `load_state_dict()` and pickling work.

    Raises:
        ValueError: An argument out of range (one line naming it), before the optimizer
            is touched.

    Examples:
        >>> import torch
        >>> from clr_mlflow import clr_scheduler
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scheduler = clr_scheduler(optimizer, "triangular2", 1e-3, 6e-3, step_size=2)
        >>> lrs = []
        >>> for _ in range(9):   # your training loop: one step() per iteration
        ...     lrs.append(round(scheduler.get_last_lr()[0], 6))
        ...     optimizer.step()
        ...     scheduler.step()
        >>> lrs   # the second cycle's amplitude is half the first's
        [0.001, 0.0035, 0.006, 0.0035, 0.001, 0.00225, 0.0035, 0.00225, 0.001]
    """
    need(isinstance(optimizer, Optimizer), "optimizer", "a torch.optim.Optimizer as", type(optimizer).__name__)
    need(policy in POLICIES, "policy", f"one of {', '.join(POLICIES)} for", policy)
    need(is_finite(base_lr) and base_lr > 0, "base_lr", "positive finite", base_lr)
    need(is_finite(max_lr) and max_lr >= base_lr, "max_lr", f"finite value >= base_lr={base_lr} for", max_lr)
    need(policy != "one_cycle" or max_lr > base_lr, "max_lr", f"value > base_lr={base_lr} (policy=one_cycle) for",
         max_lr)
    if policy in CLR_MODES:
        need(is_int(step_size, 1), "step_size", f"positive integer (policy={policy})", step_size)
    if policy == "one_cycle":
        need(is_int(total_iters, 2), "total_iters", "integer >= 2 (policy=one_cycle)", total_iters)
    need(is_finite(gamma) and 0 < gamma <= 1, "gamma", "value in (0, 1] for", gamma)
    need(is_finite(anneal_frac) and 0 <= anneal_frac < 1, "anneal_frac", "value in [0, 1) for", anneal_frac)
    need(is_finite(anneal_div) and anneal_div >= 1, "anneal_div", "finite value >= 1 for", anneal_div)
    need(isinstance(cycle_momentum, bool), "cycle_momentum", "True or False as", cycle_momentum)
    if cycle_momentum:
        need(is_finite(base_momentum) and is_finite(max_momentum) and 0 <= base_momentum < max_momentum < 1,
             "base_momentum/max_momentum", "0 <= base < max < 1 for", (base_momentum, max_momentum))
    first = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    need(is_finite(first) and first > 0, "optimizer.param_groups[0]['lr']",
         "positive (other groups keep their ratio to it)", first)
    # plain floats from here: torch takes 0-dim tensors as lrs, the schedule's math wants numbers
    schedule = make_schedule(policy, float(base_lr), float(max_lr), step_size or 1, total_iters or 1, float(gamma),
                             float(anneal_frac), float(anneal_div))
    return ScheduleLR(optimizer, schedule, (base_momentum, max_momentum) if cycle_momentum else None)
