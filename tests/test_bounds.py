import numpy as np
import pytest

from clr_mlflow.bounds import accuracy, bounds_frame, loss_edge, min_div10, steepest, suggest_bounds

LRS = np.geomspace(1e-5, 10, 601)  # 100 points per decade
X = np.log10(LRS)


def test_steepest_finds_the_inflection_of_a_tanh_descent():
    # loss falls like -tanh around lr = 1e-2 and rises after lr = 1: steepest slope at 1e-2
    s = 2 - np.tanh(2 * (X + 2)) + np.where(X > 0, 5 * X**2, 0)
    got = steepest(LRS, s, divisor=4)
    assert got.max_lr == pytest.approx(1e-2, rel=0.03)
    assert got.base_lr == pytest.approx(got.max_lr / 4)


def test_steepest_only_looks_before_the_minimum():
    # the rise after the minimum is steeper than anything before it, but it is not a descent
    s = (X + 1) ** 2 + 1 - np.where(X > 0.5, 40 * (X - 0.5), 0)
    s = np.where(X > 0.5, 1e3, s)
    assert steepest(LRS, s).max_lr < 1.0


def test_loss_edge_and_min_div10_on_a_parabola_with_known_minimum():
    s = (X + 1) ** 2 + 1  # minimum at lr = 0.1
    edge = loss_edge(LRS, s, divisor=3)
    assert edge.max_lr == pytest.approx(0.1, rel=1e-9) and edge.base_lr == pytest.approx(0.1 / 3)
    m = min_div10(LRS, s, divisor=4)
    assert m.max_lr == pytest.approx(0.01) and m.base_lr == pytest.approx(0.0025)


def test_loss_rules_use_the_finite_prefix_of_a_curve_that_blew_up():
    s = (X + 1) ** 2 + 1
    s[450:] = np.nan
    assert loss_edge(LRS, s).max_lr == pytest.approx(0.1)
    s[350:] = np.inf
    assert loss_edge(LRS, s).max_lr == pytest.approx(LRS[349])


@pytest.mark.parametrize("curve,why", [
    (np.full(601, np.nan), "no finite"),
    (np.full(601, np.inf), "no finite"),
    (np.array([3.0, 2.0, 1.0, 0.5, 0.2]), "too short"),
    (np.full(601, 2.3), "flat"),
    (np.linspace(2.0, 5.0, 601), "flat"),  # only ever rises
    (np.array([]), "no finite"),
])
def test_unreadable_curves_give_a_reason_not_a_crash(curve, why):
    lrs = LRS[: len(curve)]
    for rule in (steepest, loss_edge, min_div10):
        got = rule(lrs, curve)
        assert not got.ok and why in got.note


def test_accuracy_rule_base_where_it_starts_to_rise_max_where_it_stops():
    lrs = np.geomspace(1e-4, 1, 9)
    acc = [0.10, 0.10, 0.12, 0.30, 0.50, 0.60, 0.62, 0.40, 0.10]
    got = accuracy(lrs, acc)
    assert (got.base_lr, got.max_lr) == (pytest.approx(lrs[3]), pytest.approx(lrs[6]))


def test_accuracy_rule_stops_where_accuracy_turns_ragged():
    lrs = np.geomspace(1e-4, 1, 6)
    got = accuracy(lrs, [0.10, 0.20, 0.40, 0.45, 0.38, 0.60])
    assert (got.base_lr, got.max_lr) == (pytest.approx(lrs[1]), pytest.approx(lrs[3]))


@pytest.mark.parametrize("acc,why", [([], "not measured"), ([0.1, 0.2], "too short"),
                                     ([0.1, 0.1, 0.11, 0.1], "never rose"), ([np.nan] * 5, "too short")])
def test_accuracy_rule_reasons(acc, why):
    got = accuracy(np.geomspace(1e-4, 1, len(acc)), acc)
    assert not got.ok and why in got.note


def test_table_has_one_row_per_rule_and_marks_the_selected_one():
    s = (X + 1) ** 2 + 1
    table = bounds_frame(suggest_bounds(LRS, s), "loss_edge")
    assert list(table["rule"]) == ["min_div10", "steepest", "loss_edge", "accuracy"]
    assert list(table["selected"]) == [False, False, True, False]
    assert {"rule", "base_lr", "max_lr", "selected", "note"} <= set(table.columns)
    assert np.isnan(table.loc[3, "max_lr"]) and "not measured" in table.loc[3, "note"]
