"""Range-test seeds side by side in one batched model (batched.py) against the same seeds
one after another (seeds.run_seeds), on the CPU: the loop's K curves, the optimizer twin,
each seed's data order, the bounds table, the tracked series, and the state put back.

Tolerances: vmap runs each seed's matmul/conv as one batched kernel (bmm, grouped conv)
that sums in another order, so values differ in the last bits (~1e-7 relative) from the
start. On the MLP that is all (measured <= 2.2e-7 through divergence; rtol 1e-5). On the
small CNN at batch 32 training amplifies it (a max-pool near-tie flips, then sharp BN
dynamics grow it): the one-after-another run itself moves by as much (1e-3 raw, 3e-4
smoothed) when only the conv memory layout changes (channels_last), so the CNN is held to
rtol 1e-5 for its first steps, 2e-2 raw and 2e-3 smoothed for the whole curve.
"""
import copy
import logging
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import clr_mlflow
from clr_mlflow.core import batched
from clr_mlflow.core.curve import sweep_lrs
from clr_mlflow.core.range_test import range_test, range_tests

ARGS = dict(num_iters=60, start_lr=1e-4, end_lr=10.0, bounds_rule="valley", track=False, progress=False)


def mlp_data(generator: bool):
    torch.manual_seed(0)
    x = torch.randn(640, 20)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(5) if generator else None)


def mlp_setup(optimizer: str = "sgd", generator: bool = True, with_state: bool = False):
    """A small MLP on (x, y) batches, two param groups (other lr and weight decay for the
    head); `with_state`: the optimizer has taken a step, so momentum/moments are there."""
    loader = mlp_data(generator)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-4, "weight_decay": 0}]
    opt = (torch.optim.SGD(groups, lr=1e-4, momentum=0.9, nesterov=True, weight_decay=5e-4) if optimizer == "sgd"
           else torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-2))
    if with_state:
        x, y = next(iter(mlp_data(False)))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, loader


def state_of(model, opt, loader):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state(),
            random.getstate(), np.random.get_state()[1].copy(),
            loader.generator.get_state() if loader.generator is not None else None)


def assert_same_state(a, b):
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert str(a[1]) == str(b[1])
    assert torch.equal(a[2], b[2]) and a[3] == b[3] and np.array_equal(a[4], b[4])
    assert (a[5] is None and b[5] is None) or torch.equal(a[5], b[5])


def both_paths(setup, **args):
    """The same seeds one after another and batched, and the state after each."""
    out = {}
    for is_batched in (False, True):
        model, opt, loader = setup()
        before = state_of(model, opt, loader)
        out[is_batched] = clr_mlflow.lr_find(model, opt, loader, batched_seeds=is_batched, **args)
        assert_same_state(before, state_of(model, opt, loader))  # put back bit for bit
    return out[False], out[True]


def assert_curves_close(serial, batch, rtol, smoothed_rtol=None, first=None, first_rtol=1e-5):
    assert [r.seed for r in batch.seed_results] == list(range(len(serial.seed_results)))
    for a, b in zip(serial.seed_results, batch.seed_results):
        assert len(a.lrs) == len(b.lrs) and a.stop_reason.split(":")[0] == b.stop_reason.split(":")[0]
        np.testing.assert_array_equal(a.lrs, b.lrs)
        np.testing.assert_allclose(b.losses, a.losses, rtol=rtol)
        np.testing.assert_allclose(b.smoothed, a.smoothed, rtol=smoothed_rtol or rtol)
        if first:
            np.testing.assert_allclose(b.losses[:first], a.losses[:first], rtol=first_rtol)


@pytest.mark.parametrize("optimizer,generator,with_state", [
    ("sgd", True, False), ("sgd", False, True), ("adamw", True, True), ("adamw", False, False)])
def test_batched_seeds_equal_one_after_another_on_an_mlp(optimizer, generator, with_state):
    serial, batch = both_paths(lambda: mlp_setup(optimizer, generator, with_state), seeds=3, **ARGS)
    assert len({r.losses[0] for r in serial.seed_results}) == 3  # three initialisations and data orders
    assert all("diverged" in r.stop_reason for r in serial.seed_results)  # each cut at its own stop
    assert_curves_close(serial, batch, rtol=1e-5)
    # the bounds table over seeds: same numbers, same notes
    a, b = serial.bounds, batch.bounds
    assert a.columns.tolist() == b.columns.tolist() and a["note"].tolist() == b["note"].tolist()
    for col in a.columns.drop(["rule", "note", "selected"]):
        np.testing.assert_allclose(b[col].to_numpy(float), a[col].to_numpy(float), rtol=1e-5)
    assert a["selected"].tolist() == b["selected"].tolist()


def test_batched_small_cnn_with_batchnorm_on_cifar_batches(cifar, data_dir):
    from clr_mlflow.data import datasets as data
    from clr_mlflow.data.batches import Batches, channel_stats
    from clr_mlflow.core.engine import make_optimizer, seed_everything
    from clr_mlflow.data.models import small_cnn

    ds = data.load(str(cifar), data_dir, limit_train=640, limit_test=100, image_size=16, seed=0)
    mean, std = channel_stats(ds.train)

    def setup():
        seed_everything(0)
        model = small_cnn()
        return (model, make_optimizer(model, "sgd", 1e-4, 0.9, True, 5e-4),
                Batches(ds.train, 32, torch.device("cpu"), mean, std, True, 0))  # shuffled + augmented

    serial, batch = both_paths(setup, seeds=3, num_iters=30, start_lr=1e-4, end_lr=0.1, track=False,
                               progress=False)
    assert_curves_close(serial, batch, rtol=2e-2, smoothed_rtol=2e-3, first=8)


class Recorder:
    """A Sink that keeps what it is given."""

    def __init__(self):
        self.got = []

    def series(self, steps, values):
        self.got.append((steps, values))

    def points(self, steps, values):
        pass

    def series_of(self, key):
        got = [(s, v[key]) for s, v in self.got if key in v]
        return np.concatenate([s for s, _ in got]), np.concatenate([v for _, v in got])


class TableStepper:
    """Stepper's contract replaying a table: row i = step i's loss per column."""

    def __init__(self, table):
        self.model = nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        self.device, self.scaler, self.table, self.steps = torch.device("cpu"), None, torch.tensor(table), 0

    def step(self, batches):
        row = self.table[self.steps]
        self.steps += 1
        return (row if len(row) > 1 else row[0]), {}, False


@pytest.mark.parametrize("sync_every", [1, 8])
def test_k_curves_in_one_loop_equal_k_loops_and_stop_each_at_its_own_step(sync_every):
    n = 40
    steps = np.arange(n, dtype=float)
    table = np.stack([3 - 0.05 * steps, 3 - 0.03 * steps, 3 - 0.04 * steps], 1)
    table[12:, 0] = 100.0           # column 0 diverges at step 12
    table[27, 2] = float("nan")     # column 2 stops at 27; column 1 runs to the end
    lrs = sweep_lrs(1e-3, 1.0, n)
    sinks = [Recorder() for _ in range(3)]
    stepper = TableStepper(table)
    together = range_tests(stepper, [0], lrs, sinks=sinks, sync_every=sync_every, progress=False)
    assert stepper.steps == n
    for k in range(3):
        alone_sink = Recorder()
        alone = range_test(TableStepper(table[:, [k]]), [0], lrs, sink=alone_sink, sync_every=sync_every,
                           progress=False)
        for field in ("lrs", "losses", "smoothed"):
            np.testing.assert_array_equal(getattr(together[k], field), getattr(alone, field))
        assert together[k].stop_reason == alone.stop_reason
        for key in ("range_test/lr", "range_test/loss", "range_test/smoothed_loss"):
            for got, want in zip(sinks[k].series_of(key), alone_sink.series_of(key)):
                np.testing.assert_array_equal(got, want)
    assert [len(r.lrs) for r in together] == [13, n, 28]
    # once every column has stopped, the loop stops (at the end of that chunk)
    table[30:, 1] = 100.0
    stepper = TableStepper(table)
    together = range_tests(stepper, [0], lrs, sinks=[Recorder() for _ in range(3)], sync_every=sync_every,
                           progress=False)
    alone = range_test(TableStepper(table[:, [1]]), [0], lrs, sync_every=sync_every, progress=False)
    assert 30 < len(alone.lrs) < n and [len(r.lrs) for r in together] == [13, len(alone.lrs), 28]
    assert stepper.steps == -(-len(alone.lrs) // sync_every) * sync_every


def test_batched_seeds_track_the_same_series_as_one_after_another(tracking):
    from mlflow import MlflowClient

    def run(is_batched):
        return clr_mlflow.lr_find(*mlp_setup(), seeds=3, batched_seeds=is_batched,
                                  **(ARGS | dict(track=True)))

    serial, batch = run(False), run(True)
    client = MlflowClient()
    assert set(client.get_run(batch.run_id).data.metrics) == set(client.get_run(serial.run_id).data.metrics)
    for k, r in enumerate(batch.seed_results):
        h = sorted(client.get_metric_history(batch.run_id, f"range_test/seed{k}/smoothed_loss"), key=lambda m: m.step)
        np.testing.assert_array_equal([m.step for m in h], np.arange(len(r.lrs)))
        np.testing.assert_allclose([m.value for m in h], r.smoothed, rtol=1e-12)
    h = sorted(client.get_metric_history(batch.run_id, "range_test/loss"), key=lambda m: m.step)
    np.testing.assert_allclose([m.value for m in h], batch.seed_results[0].losses, rtol=1e-12)


def test_auto_mode_runs_one_after_another_on_the_cpu_bit_for_bit():
    auto = clr_mlflow.lr_find(*mlp_setup(), seeds=2, **ARGS)
    serial = clr_mlflow.lr_find(*mlp_setup(), seeds=2, batched_seeds=False, **ARGS)
    for a, b in zip(auto.seed_results, serial.seed_results):
        np.testing.assert_array_equal(a.losses, b.losses)


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 3))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("case", ["dropout", "loss dict"])
def test_what_vmap_cannot_run_falls_back_in_auto_mode_and_raises_when_forced(case, monkeypatch, caplog):
    def setup():
        model, opt, loader = mlp_setup()
        if case == "dropout":
            torch.manual_seed(1)
            model = Dropped()
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        return model, opt, loader

    loss_fn = (lambda m, b: {"ce": F.cross_entropy(m(b[0]), b[1])}) if case == "loss dict" else None
    args = ARGS | dict(seeds=2, loss_fn=loss_fn)
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        clr_mlflow.lr_find(*setup(), batched_seeds=True, **args)
    serial = clr_mlflow.lr_find(*setup(), batched_seeds=False, **args)
    monkeypatch.setattr(batched, "unsupported", lambda *a, **k: None)  # auto mode batching on the CPU
    model, opt, loader = setup()
    before = state_of(model, opt, loader)
    with caplog.at_level(logging.INFO, logger="clr_mlflow.core.batched"):
        auto = clr_mlflow.lr_find(model, opt, loader, **args)
    assert "the batched step failed" in caplog.text  # it was tried, and fell back
    assert_same_state(before, state_of(model, opt, loader))
    for a, b in zip(auto.seed_results, serial.seed_results):
        np.testing.assert_array_equal(a.losses, b.losses)  # the fallback is the one-after-another run


@pytest.mark.parametrize("change,words", [
    (dict(optimizer="rmsprop"), "optimizer RMSprop"), (dict(scaler=True), "GradScaler"),
    (dict(val_loader=True), "val_loader"), (dict(batched_seeds="yes"), "batched_seeds")])
def test_batched_seeds_true_says_why_not_before_anything_runs(change, words):
    model, opt, loader = mlp_setup()
    if change.get("optimizer"):
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    args = ARGS | dict(seeds=2, batched_seeds=change.get("batched_seeds", True))
    if change.get("scaler"):
        args["scaler"] = torch.amp.GradScaler("cpu")
    if change.get("val_loader"):
        args |= dict(val_loader=mlp_data(False), eval_every=10)
    with pytest.raises(ValueError, match=words):
        clr_mlflow.lr_find(model, opt, loader, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_seeds_on_cuda_auto_mode():
    def setup():
        model, opt, loader = mlp_setup()
        return model.cuda(), opt, loader  # the optimizer keeps the same Parameter objects

    serial, batch = clr_mlflow.lr_find(*setup(), seeds=3, batched_seeds=False, **ARGS), \
        clr_mlflow.lr_find(*setup(), seeds=3, **ARGS)
    assert_curves_close(serial, batch, rtol=1e-3)
