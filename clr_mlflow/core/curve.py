"""Range-test math: the lr sweep, the debiased EMA and the divergence rule.

Pure numpy, so every number here can be checked by hand in the tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SWEEPS = ("exp", "linear")


def sweep_lrs(lr_start: float, lr_end: float, num_iters: int, sweep: str = "exp") -> np.ndarray:
    """The lr of every range-test iteration: first exactly `lr_start`, last exactly `lr_end`."""
    if sweep == "exp":
        lrs = np.geomspace(lr_start, lr_end, num_iters)
    elif sweep == "linear":
        lrs = np.linspace(lr_start, lr_end, num_iters)
    else:
        raise ValueError(f"Expected sweep in {SWEEPS}, but got {sweep!r}")
    # geomspace rounds its end points on some platforms; the contract is exact ends.
    lrs[0], lrs[-1] = lr_start, lr_end
    return lrs


@dataclass
class EMASmoother:
    """Debiased exponential moving average: a = beta*a + (1-beta)*x; s = a / (1 - beta**t).

    Stateful so the loop can feed it chunk by chunk; `update` of a whole array gives the
    same numbers as feeding the values one at a time.
    """

    beta: float = 0.98
    avg: float = 0.0
    count: int = 0

    def update(self, values) -> np.ndarray:
        out = np.empty(len(values), dtype=np.float64)
        for i, x in enumerate(np.asarray(values, dtype=np.float64)):
            self.count += 1
            self.avg = self.beta * self.avg + (1.0 - self.beta) * x
            out[i] = self.avg / (1.0 - self.beta**self.count)
        return out


def smooth(values, beta: float = 0.98) -> np.ndarray:
    return EMASmoother(beta).update(values)


@dataclass
class DivergenceRule:
    """Stop once the smoothed loss exceeds `factor` x its best value, or a loss is not finite."""

    factor: float = 4.0
    best: float = math.inf
    reason: str | None = field(default=None)

    def first_stop(self, losses: np.ndarray, smoothed: np.ndarray, start: int = 0) -> int | None:
        """Index (within the chunk) of the first iteration that triggers the stop, or None.

        `start` is the global iteration of the chunk's first value, used in the reason.
        """
        for i, (raw, s) in enumerate(zip(losses, smoothed)):
            if not (math.isfinite(raw) and math.isfinite(s)):
                self.reason = f"loss not finite ({raw}) at iteration {start + i}"
                return i
            if s > self.factor * self.best:
                self.reason = (
                    f"diverged at iteration {start + i}: smoothed loss {s:.4g} > "
                    f"{self.factor:g} x best {self.best:.4g}"
                )
                return i
            self.best = min(self.best, s)
        return None
