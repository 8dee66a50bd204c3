import math
import pickle

import numpy as np
import pytest
import torch

from clr_mlflow.core.schedules import CyclicLR, Fixed, OneCycle, ScheduleLR, clr_scheduler, make_schedule


def formula(t, base, top, step, mode, gamma=1.0):
    """The CLR formulas, written out independently of the package."""
    cycle = math.floor(1 + t / (2 * step))
    x = abs(t / step - 2 * cycle + 1)
    scale = {"triangular": 1.0, "triangular2": 1 / 2 ** (cycle - 1), "exp_range": gamma**t}[mode]
    return base + (top - base) * max(0.0, 1 - x) * scale


def lrs_seen(n, make_scheduler, lr):
    """The lr an optimizer step sees at each of n iterations under a scheduler."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def torch_cyclic(n, base, top, step, mode, gamma=1.0):
    return lrs_seen(n, lambda opt: torch.optim.lr_scheduler.CyclicLR(
        opt, base, top, step_size_up=step, mode=mode, gamma=gamma, cycle_momentum=False), base)


def ours_through_scheduler(n, schedule):
    return lrs_seen(n, lambda opt: ScheduleLR(opt, schedule), schedule.base_lr)


@pytest.mark.parametrize("mode,gamma", [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.999)])
def test_clr_modes_match_the_formula_and_torch_cyclic_lr_over_several_cycles(mode, gamma):
    n, step = 5 * 2 * 25 + 7, 25
    s = CyclicLR(0.001, 0.006, step_size=step, mode=mode, gamma=gamma)
    expected = [formula(t, 0.001, 0.006, step, mode, gamma) for t in range(n)]
    np.testing.assert_allclose(s.lrs(n), expected, rtol=1e-12)
    np.testing.assert_allclose(ours_through_scheduler(n, s), torch_cyclic(n, 0.001, 0.006, step, mode, gamma),
                               rtol=1e-9)


def test_triangular_hand_checked_points():
    s = CyclicLR(1.0, 3.0, step_size=4)
    assert [s.lr(t) for t in (0, 2, 4, 6, 8, 12, 16)] == [1.0, 2.0, 3.0, 2.0, 1.0, 3.0, 1.0]
    s2 = CyclicLR(1.0, 3.0, step_size=4, mode="triangular2")
    assert [s2.lr(t) for t in (4, 12, 20)] == [3.0, 2.0, 1.5]


def test_one_cycle_shape():
    s = OneCycle(0.01, 0.1, total_iters=1000, anneal_frac=0.1, anneal_div=100)
    lrs = s.lrs(1000)
    assert lrs[0] == pytest.approx(0.01)
    assert lrs.argmax() == 450 and lrs.max() == pytest.approx(0.1)
    assert lrs[900] == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(0.0001)
    assert np.all(np.diff(lrs[:451]) > 0) and np.all(np.diff(lrs[450:]) < 0)
    assert lrs[225] == pytest.approx(0.055)


def test_fixed_is_constant_at_base_lr():
    assert set(Fixed(0.003, 0.01).lrs(50)) == {0.003}


def test_exp_range_uses_global_iteration():
    s = CyclicLR(0.0, 1.0, step_size=10, mode="exp_range", gamma=0.9)
    assert s.lr(30) == pytest.approx(0.9**30)


def test_state_dict_round_trip_mid_cycle():
    sched_args = dict(policy="triangular2", base_lr=0.001, max_lr=0.006, step_size=10, total_iters=100)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.001, momentum=0.9)
    a = ScheduleLR(opt, make_schedule(**sched_args), momentum=(0.85, 0.95))
    for _ in range(27):
        opt.step()
        a.step()
    state = pickle.loads(pickle.dumps(a.state_dict()))
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5, momentum=0.9)
    b = ScheduleLR(opt2, make_schedule(**(sched_args | {"base_lr": 0.1, "max_lr": 0.2})))
    b.load_state_dict(state)
    for _ in range(30):
        opt.step(); a.step(); opt2.step(); b.step()  # noqa: E702
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == a.schedule.lr(a.last_epoch)
        assert b.get_last_lr() == a.get_last_lr()
    assert b.last_epoch == 57


def assert_plain(x, where="state"):
    """Numbers, strings, None, and lists/tuples/dicts of them: no class of ours (nor NumPy)."""
    if isinstance(x, dict):
        for k, v in x.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            assert_plain(v, f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert x is None or type(x) in (bool, int, float, str), f"{where} is a {type(x).__name__}: {x!r}"


@pytest.mark.parametrize("policy,kwargs", [
    ("triangular", dict(step_size=6)),
    ("triangular2", dict(step_size=5, cycle_momentum=True)),
    ("exp_range", dict(step_size=4, gamma=0.97)),
    ("one_cycle", dict(total_iters=40, anneal_frac=0.2, cycle_momentum=True)),
    ("fixed", dict()),
])
def test_state_dict_is_plain_and_resumes_through_torch_load_weights_only(policy, kwargs, tmp_path):
    def sgd(lr):
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=0.9)

    def seen(opt, sched, n):
        out = []
        for _ in range(n):
            out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
            opt.step()
            sched.step()
        return out

    opt = sgd(0.01)
    # bounds given as a NumPy scalar and a tensor: the state still holds Python numbers
    sched = clr_scheduler(opt, policy, np.float64(0.01), torch.tensor(0.1, dtype=torch.float64), **kwargs)
    seen(opt, sched, 17)
    state = sched.state_dict()
    assert_plain(state)
    torch.save({"optimizer": opt.state_dict(), "scheduler": state}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # torch's default, said out loud
    assert loaded["scheduler"] == state
    opt2 = sgd(0.5)
    other = clr_scheduler(opt2, "triangular", 0.5, 0.9, step_size=3)  # every setting differs
    opt2.load_state_dict(loaded["optimizer"])  # as torch's own schedulers: the group lrs come with the optimizer
    other.load_state_dict(loaded["scheduler"])
    assert other.schedule == sched.schedule and other.momentum == sched.momentum and other.last_epoch == 17
    after = seen(opt, sched, 30)
    assert seen(opt2, other, 30) == after
    assert [lr for lr, _ in after] == pytest.approx([sched.schedule.lr(t) for t in range(17, 47)], rel=1e-12)
    if policy in ("triangular", "triangular2", "exp_range"):
        gamma = kwargs.get("gamma", 1.0)
        assert [lr for lr, _ in after] == pytest.approx(
            [formula(t, 0.01, 0.1, kwargs["step_size"], policy, gamma) for t in range(17, 47)], rel=1e-9)
    assert other.state_dict() == sched.state_dict()


def test_load_state_dict_still_takes_a_state_holding_the_schedule_object():
    """A state saved before state_dict() went plain (pickled, weights_only=False) still loads."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = ScheduleLR(opt, CyclicLR(0.1, 1.0, step_size=4), momentum=None)
    for _ in range(5):
        opt.step()
        sched.step()
    old = dict(sched.state_dict(), schedule=sched.schedule)
    other = ScheduleLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), Fixed(0.1, 0.1))
    other.load_state_dict(pickle.loads(pickle.dumps(old)))
    assert other.schedule == sched.schedule and other.last_epoch == 5
    other.optimizer.step()
    other.step()
    assert other.get_last_lr() == [pytest.approx(formula(6, 0.1, 1.0, 4, "triangular"))]


def test_load_state_dict_rejects_an_unknown_schedule():
    sched = ScheduleLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), Fixed(0.1, 0.1))
    state = sched.state_dict()
    with pytest.raises(ValueError, match="schedule dict with type"):
        sched.load_state_dict(dict(state, schedule={"type": "Cosine", "base_lr": 0.1, "max_lr": 1.0}))


def test_momentum_cycles_opposite_to_lr_and_reaches_adamw_beta1():
    s = CyclicLR(0.1, 1.0, step_size=4)
    for opt_cls, read in ((torch.optim.SGD, lambda g: g["momentum"]), (torch.optim.AdamW, lambda g: g["betas"][0])):
        opt = opt_cls([torch.zeros(1, requires_grad=True)], lr=0.1, **({"momentum": 0.9} if opt_cls is torch.optim.SGD else {}))
        sched = ScheduleLR(opt, s, momentum=(0.85, 0.95))
        seen = []
        for _ in range(9):
            seen.append((opt.param_groups[0]["lr"], read(opt.param_groups[0])))
            opt.step()
            sched.step()
        assert seen[0] == (pytest.approx(0.1), pytest.approx(0.95))
        assert seen[4] == (pytest.approx(1.0), pytest.approx(0.85))
        assert seen[2][1] == pytest.approx(0.90) and seen[8][1] == pytest.approx(0.95)


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="policy"):
        make_schedule("cosine", 0.1, 1.0, 10, 100)
