import math

import numpy as np
import pytest

from clr_mlflow.core.curve import DivergenceRule, EMASmoother, smooth, sweep_lrs


def test_exp_sweep_is_geometric_with_exact_ends():
    lrs = sweep_lrs(1e-5, 10.0, 7, "exp")
    assert lrs[0] == 1e-5 and lrs[-1] == 10.0
    np.testing.assert_allclose(lrs, [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], rtol=1e-12)


def test_linear_sweep_has_even_steps_and_exact_ends():
    lrs = sweep_lrs(0.001, 0.02, 20, "linear")
    assert lrs[0] == 0.001 and lrs[-1] == 0.02
    np.testing.assert_allclose(np.diff(lrs), np.full(19, 0.001), rtol=1e-9)


def test_unknown_sweep_is_rejected():
    with pytest.raises(ValueError, match="sweep"):
        sweep_lrs(1e-3, 1.0, 10, "cosine")


def test_smoothing_matches_hand_computation():
    # beta = 0.5: a1 = 0.5, s1 = 0.5/0.5 = 1; a2 = 0.25 + 1 = 1.25, s2 = 1.25/0.75;
    # a3 = 0.625 + 1.5 = 2.125, s3 = 2.125/0.875
    np.testing.assert_allclose(smooth([1.0, 2.0, 3.0], beta=0.5), [1.0, 1.25 / 0.75, 2.125 / 0.875])


def test_smoothing_of_a_constant_is_the_constant_from_the_first_step():
    # the debiasing is what makes the first values right (a plain EMA would start at 0.04)
    np.testing.assert_allclose(smooth([2.0] * 5, beta=0.98), [2.0] * 5)


def test_smoothing_in_chunks_equals_smoothing_at_once():
    x = np.random.default_rng(0).random(50)
    s = EMASmoother(0.98)
    chunked = np.concatenate([s.update(x[:7]), s.update(x[7:8]), s.update(x[8:])])
    np.testing.assert_array_equal(chunked, smooth(x, 0.98))


def test_stop_rule_fires_when_the_rise_passes_factor_minus_one_times_the_drop():
    rule = DivergenceRule(4.0)
    raw = np.full(5, 3.0)                           # no step-to-step noise: the drop is the scale
    smoothed = np.array([3.0, 2.0, 1.0, 6.9, 7.1])  # fell 2 to its best 1: stop above 1 + 3 x 2 = 7
    assert rule.first_stop(raw, smoothed, start=10) == 4
    assert "iteration 14" in rule.reason and rule.best == 1.0 and rule.drop == 2.0


def test_stop_rule_on_a_curve_that_has_not_fallen_uses_the_noise():
    rule = DivergenceRule(4.0, beta=0.5)
    raw = np.array([1.0, 2.0, 1.0, 2.0, 1.0])       # changes of 1: the noise yardstick is 1
    smoothed = np.array([1.0, 1.0, 1.0, 3.9, 4.1])  # never fell: stop once 3 x 1 above the best
    assert rule.first_stop(raw, smoothed) == 4
    assert rule.noise == pytest.approx(1.0)


def test_stop_rule_does_not_let_a_blow_up_inflate_its_noise_yardstick():
    rule = DivergenceRule(4.0, beta=0.5)
    raw = np.array([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1000.0])
    assert rule.first_stop(raw, np.ones(7)) is None
    assert rule.noise < 3.0  # the 998 jump counted as at most 3 x the estimate so far


def _rising_curve(seed=0, n=300):
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, n)
    raw = 2.3 - 1.2 * np.sin(np.pi * np.minimum(t, 0.7) / 1.4) + 200 * np.maximum(t - 0.7, 0) ** 2 \
        + rng.normal(0, 0.05, n)
    return raw, smooth(raw, 0.98)


@pytest.mark.parametrize("scale, shift", [(1.0, -1.0), (1.0, 100.0), (1e-3, 0.0), (-1.0, 0.0)])
def test_stop_rule_reads_a_shifted_or_scaled_loss_the_same_way(scale, shift):
    """Any loss scale and sign: the stop step of a*loss + b (a > 0) is the unshifted one's; a
    loss that is negative all along (a = -1 flips the curve, so compare with its own negative
    reference: the test stops, and not after 2 steps as 'smoothed > 4 x best' does)."""
    raw, smoothed = _rising_curve()
    reference = DivergenceRule(4.0).first_stop(raw, smoothed)
    assert reference is not None and 150 < reference < 300
    if scale < 0:
        negative = raw - 10.0   # every loss < 0
        got = DivergenceRule(4.0).first_stop(negative, smooth(negative, 0.98))
        assert got == reference
        naive_best = np.minimum.accumulate(smooth(negative, 0.98))
        assert np.flatnonzero(smooth(negative, 0.98) > 4 * naive_best)[0] < 3  # the peers' rule
        return
    moved = scale * raw + shift
    assert DivergenceRule(4.0).first_stop(moved, smooth(moved, 0.98)) == reference


def test_stop_rule_keeps_its_best_across_chunks():
    rule = DivergenceRule(2.0)
    assert rule.first_stop(np.array([1.0, 0.5]), np.array([1.0, 0.5])) is None
    assert rule.first_stop(np.array([1.1]), np.array([1.1]), start=2) == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_stop_rule_fires_on_a_non_finite_loss(bad):
    rule = DivergenceRule(4.0)
    assert rule.first_stop(np.array([1.0, bad, 1.0]), np.array([1.0, 1.0, 1.0])) == 1
    assert "not finite" in rule.reason
