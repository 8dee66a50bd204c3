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


def test_stop_rule_fires_when_smoothed_exceeds_factor_times_best():
    rule = DivergenceRule(4.0)
    losses = np.array([3.0, 2.0, 1.0, 3.9, 4.1])
    assert rule.first_stop(losses, losses, start=10) == 4
    assert "iteration 14" in rule.reason and rule.best == 1.0


def test_stop_rule_keeps_its_best_across_chunks():
    rule = DivergenceRule(2.0)
    assert rule.first_stop(np.array([1.0, 0.5]), np.array([1.0, 0.5])) is None
    assert rule.first_stop(np.array([1.1]), np.array([1.1]), start=2) == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_stop_rule_fires_on_a_non_finite_loss(bad):
    rule = DivergenceRule(4.0)
    assert rule.first_stop(np.array([1.0, bad, 1.0]), np.array([1.0, 1.0, 1.0])) == 1
    assert "not finite" in rule.reason
