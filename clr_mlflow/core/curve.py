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


NOISE_CLIP = 3.0     # a step change counts into the noise yardstick up to 3x the yardstick so far
NOISE_SETTLE = 5     # ... once this many changes have set it


@dataclass
class DivergenceRule:
    """Stop once the smoothed loss has climbed above its best by more than (factor - 1) x the
    loss's own scale, or a loss is not finite.

    The peers' rule, `smoothed > factor x best`, assumes a loss whose floor is 0: it stops
    after 2 steps on a loss that is negative (a log-likelihood, a contrastive loss) and
    never on one with a large constant added. Measured in the loss's own units instead, the
    rule reads the same curve the same way whatever is added to the loss or multiplied into
    it. The scale is the larger of
    - the drop: how far the smoothed loss fell to its best (from the highest value before
      it), i.e. the part of the curve the test is there to see, and
    - the noise: a debiased EMA of the step-to-step change of the raw loss, each change
      clipped at NOISE_CLIP x the estimate so far, so a blow-up does not inflate the
      yardstick it is measured with. This keeps a noisy curve that has not fallen yet
      from stopping on its first wiggle.
    For a loss falling from 2.3 to a best of 1.5 the test stops once the smoothed loss passes
    1.5 + 3 x 0.8 = 3.9 (factor 4): well past where it started, i.e. clearly diverging.
    """

    factor: float = 4.0
    beta: float = 0.98
    best: float = math.inf
    high: float = -math.inf      # the highest smoothed loss so far
    drop: float = 0.0            # highest smoothed loss before the best, minus the best
    noise_avg: float = 0.0
    noise_count: int = 0
    last_raw: float | None = None
    reason: str | None = field(default=None)

    @property
    def noise(self) -> float:
        return self.noise_avg / (1.0 - self.beta**self.noise_count) if self.noise_count else 0.0

    def _observe_noise(self, raw: float) -> None:
        if self.last_raw is not None:
            change = abs(raw - self.last_raw)
            if self.noise_count >= NOISE_SETTLE:
                change = min(change, NOISE_CLIP * self.noise)
            self.noise_count += 1
            self.noise_avg = self.beta * self.noise_avg + (1.0 - self.beta) * change
        self.last_raw = raw

    def first_stop(self, losses: np.ndarray, smoothed: np.ndarray, start: int = 0) -> int | None:
        """Index (within the chunk) of the first iteration that triggers the stop, or None.

        `start` is the global iteration of the chunk's first value, used in the reason.
        """
        for i, (raw, s) in enumerate(zip(losses, smoothed)):
            if not (math.isfinite(raw) and math.isfinite(s)):
                self.reason = f"loss not finite ({raw}) at iteration {start + i}"
                return i
            self._observe_noise(float(raw))
            scale = max(self.drop, self.noise)
            # a rise within float rounding is no rise (a constant loss smooths to 1-ulp steps)
            rounding = 16 * np.finfo(np.float64).eps * max(abs(s), abs(self.best) if self.best < math.inf else 0)
            if s - self.best > max((self.factor - 1.0) * scale, rounding):
                self.reason = (f"diverged at iteration {start + i}: smoothed loss {s:.4g} rose {s - self.best:.3g} "
                               f"above its best {self.best:.4g}, more than {self.factor - 1:g} x the loss's scale "
                               f"{scale:.3g}")
                return i
            self.high = max(self.high, s)
            if s < self.best:
                self.best = s
                self.drop = self.high - s
        return None
