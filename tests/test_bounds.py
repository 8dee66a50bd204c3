import numpy as np
import pytest

from clr_mlflow.core.bounds import (RULES, accuracy, bounds_frame, loss_edge, min_div10, slide, steepest, suggest_bounds,
                               valley)
from clr_mlflow.core.curve import smooth

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
    for rule in (steepest, loss_edge, min_div10, valley, slide):
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
    assert list(table["rule"]) == ["min_div10", "steepest", "loss_edge", "accuracy", "valley", "slide"] == list(RULES)
    assert list(table["selected"]) == [False, False, True, False, False, False]
    assert {"rule", "base_lr", "max_lr", "selected", "note"} <= set(table.columns)
    assert np.isnan(table.loc[3, "max_lr"]) and table.loc[3, "note"] == "accuracy was not measured (eval_every=0)"


def test_every_answered_row_states_its_base_lr_rule():
    s = (X + 1) ** 2 + 1
    acc_lrs = np.geomspace(1e-4, 1, 9)
    acc = [0.10, 0.10, 0.12, 0.30, 0.50, 0.60, 0.62, 0.40, 0.10]
    for row in suggest_bounds(LRS, s, acc_lrs, acc, divisor=3):
        assert row.ok, row
        if row.rule == "accuracy":
            assert row.note == "base_lr = where accuracy starts rising (10% of its rise)"
        else:
            assert row.note.startswith("base_lr = max_lr/3") and row.base_lr == pytest.approx(row.max_lr / 3)


# --- valley and slide against plain re-implementations of fastai's published loops ---
# (fastai/callback/schedule.py: valley, slide), written out here independently of bounds.py.

def fastai_valley_index(losses) -> int:
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def fastai_slide_lr(lrs, losses, lr_diff=15, rel_thresh=0.0625, x=None):
    """fastai's loop, with our two changes written out: the gradient is taken against
    x = log10(lr), and the threshold is rel_thresh x (highest loss before the minimum - minimum)."""
    low = int(np.argmin(losses))
    thresh = rel_thresh * (max(losses[: low + 1]) - losses[low])
    loss_grad = np.gradient(losses, np.log10(lrs) if x is None else x)
    r_idx = -1
    l_idx = r_idx - lr_diff
    local_min_lr = lrs[l_idx]
    while l_idx >= -len(losses) and abs(loss_grad[r_idx] - loss_grad[l_idx]) > thresh:
        local_min_lr = lrs[l_idx]
        r_idx -= 1
        l_idx -= 1
    return local_min_lr * 1.0  # adjust_value = 1


def range_curve(n, seed, noise=0.1):
    """A range test's smoothed loss: plateau, sigmoid descent, blow-up, noise, EMA, cut at 4x best."""
    rng = np.random.default_rng(seed)
    lrs = np.geomspace(1e-5, 10, n)
    x = np.log10(lrs)
    raw = 1.2 + 1.1 / (1 + np.exp(3 * (x + 1.8))) + np.where(x > -0.7, 3 * (x + 0.7) ** 2, 0)
    s = smooth(raw + noise * rng.standard_normal(n))
    best = np.minimum.accumulate(s)
    stop = int(np.argmax(s > 4 * best)) if (s > 4 * best).any() else n - 1
    return lrs[: stop + 1], s[: stop + 1]


def test_valley_on_a_curve_whose_valley_is_known_by_hand():
    # rises over points 0..100, falls strictly over 100..399 (300 points), rises after:
    # the longest falling run is 100..399, so end = 399, L = 300, start = 99, and
    # idx = 99 + int(300/3) + int(100/2) = 249
    s = np.concatenate([np.linspace(2.0, 2.1, 101), np.linspace(2.1, 1.0, 300)[1:], np.linspace(1.0, 5.0, 201)[1:]])
    assert fastai_valley_index(s) == 249
    got = valley(LRS, s, divisor=4)
    assert got.max_lr == pytest.approx(LRS[249]) and got.base_lr == pytest.approx(LRS[249] / 4)
    assert got.note == "base_lr = max_lr/4"


def test_valley_counts_a_falling_subsequence_not_only_a_contiguous_stretch():
    # a fall with upward blips every 10th point: the subsequence skipping the blips is 91
    # points long (0..99 without 9 blips), the longest contiguous stretch only 10
    s = np.linspace(3.0, 1.0, 100)
    s[10:100:10] += 0.05
    s = np.concatenate([s, np.linspace(1.0, 4.0, 30)[1:]])
    idx = fastai_valley_index(s)  # end 99, L 91, start 8: 8 + 30 + 15
    assert idx == 53
    assert valley(LRS[: len(s)], s).max_lr == pytest.approx(LRS[53])


@pytest.mark.parametrize("n,seed", [(60, 0), (100, 1), (200, 2), (391, 3), (391, 4), (1000, 5)])
def test_valley_matches_fastai_on_noisy_range_tests(n, seed):
    lrs, s = range_curve(n, seed)
    assert valley(lrs, s).max_lr == pytest.approx(lrs[fastai_valley_index(s)], rel=1e-12)


def test_valley_never_wraps_to_the_last_lr():
    # a 2-point valley at the very start: fastai's idx is -1, i.e. the last (largest) lr
    s = np.concatenate([[2.0, 1.0], np.linspace(2.5, 9.0, 20)])
    assert fastai_valley_index(s) == -1
    assert valley(LRS[:22], s).max_lr == pytest.approx(LRS[0])


def line_then_parabola(x, p0, c, a):
    """Falls with slope -c per decade up to point p0, then rises as a parabola a (x - x[p0])**2."""
    return np.where(x <= x[p0], 3.0 - c * (x - x[0]), 3.0 - c * (x[p0] - x[0]) + a * (x - x[p0]) ** 2)


@pytest.mark.parametrize("lrs,p0,a", [(LRS, 400, 2.0), (np.linspace(1e-3, 1.0, 600), 30, 20.0)])
def test_slide_on_a_curve_with_a_known_answer(lrs, p0, a):
    # slopes against log10(lr) are exact for a line and a parabola: windows reaching past p0
    # differ by more than the tolerance (0.0625 x drop), the first one on the line (right end
    # p0-1) by 0, so the last window that differed had its left end at p0-15
    x = np.log10(lrs)
    s = line_then_parabola(x, p0, 0.5, a)
    assert fastai_slide_lr(lrs, s) == pytest.approx(lrs[p0 - 15])
    got = slide(lrs, s, divisor=4)
    assert got.max_lr == pytest.approx(lrs[p0 - 15]) and got.base_lr == pytest.approx(lrs[p0 - 15] / 4)
    assert got.note == "base_lr = max_lr/4"
    if lrs is not LRS:
        # on a linear sweep, slopes per point (fastai's np.gradient, rescaled to the same mean
        # spacing) read another curve: that rule answers 5x off, so the test tells them apart
        per_point = np.arange(len(lrs)) * np.diff(x).mean()
        assert fastai_slide_lr(lrs, s, x=per_point) > 2 * lrs[p0 - 15]


@pytest.mark.parametrize("n,seed", [(60, 0), (100, 1), (200, 2), (391, 3), (391, 4), (1000, 5)])
def test_slide_matches_fastai_with_our_two_changes_on_noisy_range_tests(n, seed):
    lrs, s = range_curve(n, seed)
    assert slide(lrs, s).max_lr == pytest.approx(fastai_slide_lr(lrs, s), rel=1e-12)


def test_slide_threshold_follows_the_loss_scale():
    # slopes and the drop scale together, so units and offsets of the loss change nothing
    lrs, s = range_curve(391, 7)
    base = slide(lrs, s).max_lr
    assert slide(lrs, 1000 * s + 50).max_lr == base == slide(lrs, 0.001 * s).max_lr
    assert base == pytest.approx(fastai_slide_lr(lrs, s))


def test_slide_notes_when_no_window_is_calm_and_when_it_lands_past_the_minimum():
    # a parabola in log10(lr) with its minimum 2 decades in: slopes 15 points apart always
    # differ by 2 x 0.15 = 0.3 per decade, more than 0.0625 x drop (drop = 2**2 = 4)
    s = 1.0 + (X + 3) ** 2
    got = slide(LRS, s)
    assert got.max_lr == pytest.approx(fastai_slide_lr(LRS, s)) == pytest.approx(LRS[0])
    assert "no window was calm: slid to the first lr" in got.note
    p = np.concatenate([np.linspace(3.0, 1.0, 40), 1.0 + 0.5 * (X[40:] - X[40])])  # turns up into a straight line
    got = slide(LRS, p)
    assert got.max_lr > LRS[40] and "max_lr is past the loss minimum" in got.note


def test_slide_needs_more_points_than_its_window():
    s = np.linspace(3.0, 1.0, 15)
    got = slide(LRS[:15], s)
    assert not got.ok and got.note == "too short for slide: 15 finite points, need more than 15"
    assert valley(LRS[:15], s).ok and slide(LRS[:16], np.linspace(3.0, 1.0, 16)).ok


# --- a curve that never turned up: the bounds are lower limits, and the note says so ---

def test_a_minimum_at_the_last_point_is_flagged_not_hidden():
    s = 2 - np.tanh(X + 2)  # still falling at lr_end = 10
    rows = {r.rule: r for r in suggest_bounds(LRS, s)}
    assert rows["loss_edge"].max_lr == pytest.approx(10.0) and rows["min_div10"].max_lr == pytest.approx(1.0)
    for rule in ("min_div10", "steepest", "loss_edge", "valley"):
        assert rows[rule].ok
        assert rows[rule].note == ("base_lr = max_lr/4; minimum at the last lr: the test did not diverge, so max_lr "
                                   "is a lower limit; raise lr_end or num_iters")
    assert rows["slide"].ok and "the test did not diverge, so slide started on a falling curve" in rows["slide"].note
    assert rows["valley"].max_lr == pytest.approx(LRS[fastai_valley_index(s)])  # -1 + 200 + 100 = 299


def test_a_minimum_just_before_a_non_finite_loss_is_a_divergence():
    s = 2 - np.tanh(X + 2)
    s[-1] = np.nan  # the loss blew up: the test did diverge
    for rule in (min_div10, loss_edge, steepest, valley, slide):
        got = rule(LRS, s)
        assert got.ok and "did not diverge" not in got.note


@pytest.mark.parametrize("scale, shift", [(1.0, -1.0), (1.0, 100.0), (1e-3, 0.0), (1.0, -10.0)])
def test_every_rule_reads_a_shifted_or_scaled_loss_the_same_way(scale, shift):
    """A loss with a constant added (even one that makes it negative) or in other units gives
    every rule's same bounds, and the same flat/too-short notes."""
    rng = np.random.default_rng(3)
    n = 200
    lrs = np.geomspace(1e-6, 10, n)
    t = np.linspace(0, 1, n)
    raw = 2.3 - 1.2 * np.sin(np.pi * np.minimum(t, 0.7) / 1.4) + 200 * np.maximum(t - 0.7, 0) ** 2 \
        + rng.normal(0, 0.05, n)
    reference = {s.rule: s for s in suggest_bounds(lrs, smooth(raw), [], [], 4.0)}
    moved = scale * raw + shift
    got = {s.rule: s for s in suggest_bounds(lrs, smooth(moved), [], [], 4.0)}
    for rule, ref in reference.items():
        assert (got[rule].base_lr, got[rule].max_lr) == pytest.approx((ref.base_lr, ref.max_lr), nan_ok=True), rule
        assert got[rule].note == ref.note


@pytest.mark.parametrize("constant", [0.0, -3.0, 1e4])
def test_a_loss_that_never_changes_is_flat_whatever_its_value(constant):
    lrs = np.geomspace(1e-6, 10, 100)
    for s in suggest_bounds(lrs, np.full(100, constant), [], [], 4.0):
        if s.rule != "accuracy":
            assert not s.ok and s.note.startswith("flat"), (s.rule, s.note)
