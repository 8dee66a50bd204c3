"""The public API on users' own models, batches and losses, tracked into a real SQLite store
and read back with MlflowClient: lr_find, clr_scheduler, IterationLogger."""
import copy
import pickle

import matplotlib.figure
import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

import clr_mlflow
from clr_mlflow.core.curve import smooth, sweep_lrs


def history(run_id, key):
    h = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)
    return np.array([m.step for m in h]), np.array([m.value for m in h])


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.body(x)).squeeze(1)


def dict_batches(n=20, size=16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 4, generator=g)
        out.append({"features": x, "target": scale * (x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 1)})
    return out


def regression_setup(seed=0):
    torch.manual_seed(seed)
    model = Regressor()
    opt = torch.optim.SGD([{"params": model.body.parameters(), "lr": 1e-3},
                           {"params": model.head.parameters(), "lr": 1e-2}], momentum=0.9)
    return model, opt


def state_of(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()),
            torch.get_rng_state())


def assert_restored(model, opt, before):
    weights, opt_state, rng = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    now = opt.state_dict()
    assert [g["lr"] for g in now["param_groups"]] == [g["lr"] for g in opt_state["param_groups"]]
    for k, v in opt_state["state"].items():
        assert all(torch.equal(v[name], now["state"][k][name]) for name in v)
    assert torch.equal(torch.get_rng_state(), rng)


def test_dict_batches_dict_loss_and_two_param_groups(tracking):
    model, opt = regression_setup()
    batches = dict_batches()
    # one real step first, so there is momentum state to restore
    F.mse_loss(model(batches[0]["features"]), batches[0]["target"]).backward()
    opt.step()
    before = state_of(model, opt)
    seen = []

    def loss_fn(m, batch):
        if torch.is_grad_enabled():  # not the first batch's check, which runs without gradients
            seen.append([g["lr"] for g in opt.param_groups])
        pred = m(batch["features"])
        return {"mse": F.mse_loss(pred, batch["target"]), "l1": 0.1 * F.l1_loss(pred, batch["target"])}

    result = clr_mlflow.lr_find(model, opt, batches, loss_fn=loss_fn, num_iters=30, start_lr=1e-4, end_lr=0.02,
                                diverge=1e9, progress=False)
    assert_restored(model, opt, before)
    lrs = sweep_lrs(1e-4, 0.02, 30)
    np.testing.assert_array_equal(result.lrs, lrs)
    seen = np.array(seen)
    np.testing.assert_allclose(seen[:, 0], lrs, rtol=1e-15)
    np.testing.assert_allclose(seen[:, 1] / seen[:, 0], 10.0, rtol=1e-12)  # the groups keep their ratio
    np.testing.assert_allclose(result.losses, result.terms["mse"] + result.terms["l1"], rtol=1e-6)
    np.testing.assert_allclose(result.smoothed, smooth(result.losses, 0.98), rtol=1e-12)
    # what MLflow holds, read back
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["clr_mlflow.kind"] == "range_test"
    for key, values in (("range_test/lr", lrs), ("range_test/loss", result.losses),
                        ("range_test/loss/mse", result.terms["mse"]), ("range_test/loss/l1", result.terms["l1"])):
        steps, got = history(result.run_id, key)
        np.testing.assert_array_equal(steps, np.arange(30))
        np.testing.assert_allclose(got, values, rtol=1e-12)
    assert run.data.params["range_test.num_iters"] == "30" and run.data.params["range_test.bounds_rule"] == "steepest"
    arts = {a.path for a in MlflowClient().list_artifacts(result.run_id, "range_test")}
    assert {"range_test/curve.png", "range_test/curve.csv", "range_test/bounds.json"} <= arts
    # bounds, suggest and plot
    table = result.bounds
    chosen = table[table["selected"]].iloc[0]
    assert chosen["rule"] == "steepest"  # the default: best mean rank over five families in docs/RESULTS.md
    assert result.suggest() == (chosen["base_lr"], chosen["max_lr"])
    assert run.data.metrics["bounds/max_lr"] == pytest.approx(chosen["max_lr"])
    low = int(np.argmin(result.smoothed))
    # steepest, recomputed: the most negative slope of smoothed loss vs log10(lr), a central
    # difference over +-1 point (30 < 100 points), from point 10 (the EMA settling) to the minimum
    x, y = np.log10(lrs), result.smoothed
    slopes = {i: (y[i + 1] - y[i - 1]) / (x[i + 1] - x[i - 1]) for i in range(min(10, low // 2), low)}
    steep = lrs[min(slopes, key=slopes.get)]
    assert chosen["max_lr"] == pytest.approx(steep) and chosen["base_lr"] == pytest.approx(steep / 4)
    edge = table.set_index("rule").loc["loss_edge"]  # the loss minimum's rule, still in the table
    assert edge["max_lr"] == pytest.approx(lrs[low]) and edge["base_lr"] == pytest.approx(lrs[low] / 4)
    assert run.data.metrics["range_test/lr_at_min"] == pytest.approx(lrs[low])
    assert isinstance(result.plot(), matplotlib.figure.Figure)
    frame = result.to_frame()
    assert {"loss/mse", "loss/l1"} <= set(frame.columns) and len(frame) == 30


def test_accumulation_changes_the_lr_per_optimizer_step(tracking):
    model, opt = regression_setup(1)
    batches = dict_batches(40, seed=1)
    reference = copy.deepcopy(model)
    seen = []

    def loss_fn(m, batch):
        if torch.is_grad_enabled():  # not the first batch's check, which runs without gradients
            seen.append(opt.param_groups[0]["lr"])
        return F.mse_loss(m(batch["features"]), batch["target"])

    result = clr_mlflow.lr_find(model, opt, batches, loss_fn=loss_fn, num_iters=12, start_lr=1e-5, end_lr=1e-2,
                                accumulate=3, track=False, progress=False)
    assert len(result.lrs) == 12 and len(seen) == 36
    np.testing.assert_array_equal(np.array(seen).reshape(12, 3), np.repeat(sweep_lrs(1e-5, 1e-2, 12)[:, None], 3, 1))
    with torch.no_grad():  # the first point: the mean loss of the first 3 batches, before any step
        first = np.mean([F.mse_loss(reference(b["features"]), b["target"]).item() for b in batches[:3]])
    assert result.losses[0] == pytest.approx(first, rel=1e-6)
    assert result.run_id is None  # track=False: no run
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_grad_scaler_skipped_steps_do_not_advance_the_sweep():
    model, opt = regression_setup(2)
    batches = dict_batches(30, seed=2, scale=100.0)  # large targets: large gradients overflow at a huge scale
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**125, growth_interval=10_000)
    calls = []

    def loss_fn(m, batch):
        if torch.is_grad_enabled():  # not the first batch's check, which runs without gradients
            calls.append((scaler.get_scale(), opt.param_groups[0]["lr"]))
        return F.mse_loss(m(batch["features"]), batch["target"])

    result = clr_mlflow.lr_find(model, opt, batches, loss_fn=loss_fn, num_iters=15, start_lr=1e-7, end_lr=1e-5,
                                scaler=scaler, track=False, progress=False)
    scales = np.array([c[0] for c in calls])
    decreases = int(np.sum(scales[1:] < scales[:-1]))
    assert result.skipped_steps >= 1 and result.skipped_steps == decreases
    assert len(calls) == 15 + result.skipped_steps and len(result.lrs) == 15
    # a skipped step (the scale dropped after it) is retried at the same lr; any other advances it
    lrs = np.array([c[1] for c in calls])
    skipped = scales[1:] < scales[:-1]
    np.testing.assert_array_equal(lrs[1:][skipped], lrs[:-1][skipped])
    assert np.all(lrs[1:][~skipped] > lrs[:-1][~skipped])
    np.testing.assert_array_equal(result.lrs, sweep_lrs(1e-7, 1e-5, 15))
    assert scaler.get_scale() == 2.0**125  # the scaler is put back too


def synthetic_detection_batches(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images, targets = [], []
        for _ in range(2):
            images.append(torch.rand(3, size, size, generator=g))
            xy = torch.randint(0, size // 2, (2, 2), generator=g).float()
            wh = torch.randint(8, size // 2, (2, 2), generator=g).float()
            targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 3, (2,), generator=g)})
        out.append((images, targets))
    return out


def test_torchvision_detection_model_with_a_dict_of_losses(tracking):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                  min_size=64, max_size=64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    before = state_of(model, opt)
    with mlflow.start_run() as run:  # the user's run: lr_find logs into it
        result = clr_mlflow.lr_find(model, opt, synthetic_detection_batches(10), loss_fn=lambda m, b: m(*b),
                                    num_iters=10, start_lr=1e-5, end_lr=1e-1, diverge=1e9, progress=False)
    assert_restored(model, opt, before)
    assert result.run_id == run.info.run_id
    names = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(result.terms) == names and len(result.lrs) == 10
    np.testing.assert_allclose(result.losses, sum(result.terms.values()), rtol=1e-5)
    for name in names:
        steps, values = history(run.info.run_id, f"range_test/loss/{name}")
        np.testing.assert_array_equal(steps, np.arange(10))
        np.testing.assert_allclose(values, result.terms[name], rtol=1e-12)


def test_a_second_lr_find_in_the_same_run_gets_a_child_run(tracking, caplog):
    """Two range tests in one user run would interleave steps 0..n-1 twice in one series (and
    clash on params): the second logs into a child run, the first stays as it was."""
    model, opt = regression_setup()
    loss = lambda m, b: F.mse_loss(m(b["features"]), b["target"])  # noqa: E731
    with mlflow.start_run() as run, caplog.at_level("INFO", logger="clr_mlflow"):
        first = clr_mlflow.lr_find(model, opt, dict_batches(), loss_fn=loss, num_iters=15, diverge=1e9,
                                   progress=False)
        second = clr_mlflow.lr_find(model, opt, dict_batches(), loss_fn=loss, num_iters=12, start_lr=1e-4,
                                    diverge=1e9, progress=False)
    assert first.run_id == run.info.run_id and second.run_id != run.info.run_id
    assert f"logs into its child run {second.run_id}" in caplog.text
    child = MlflowClient().get_run(second.run_id)
    assert child.data.tags["mlflow.parentRunId"] == run.info.run_id and child.info.status == "FINISHED"
    assert child.data.params["range_test.num_iters"] == "12" and MlflowClient().get_run(run.info.run_id).data.params[
        "range_test.num_iters"] == "15"
    for result in (first, second):
        steps, lrs = history(result.run_id, "range_test/lr")
        np.testing.assert_array_equal(steps, np.arange(len(result.lrs)))  # each step once
        np.testing.assert_allclose(lrs, result.lrs, rtol=1e-12)


def test_default_loss_with_validation_accuracy_on_a_dataloader(tracking):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x[:320], y[:320]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(x[320:], y[320:]), batch_size=40)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    order = train.generator.get_state()
    result = clr_mlflow.lr_find(model, opt, train, num_iters=45, start_lr=1e-3, end_lr=10, val_loader=val,
                                eval_every=5, bounds_rule="accuracy", diverge=1e9, progress=False)
    assert torch.equal(train.generator.get_state(), order)  # the data order is put back
    assert len(result.lrs) == 45  # 20 batches an epoch: the loader cycled
    assert list(result.eval_steps) == list(range(4, 45, 5))
    assert np.all((0 <= result.accuracies) & (result.accuracies <= 1)) and result.accuracies.max() > 0.8
    steps, acc = history(result.run_id, "range_test/accuracy")
    assert list(steps) == list(range(4, 45, 5)) and np.allclose(acc, result.accuracies)
    base, top = result.suggest()
    assert result.lrs[0] <= base < top <= result.lrs[-1]


def counting_metric(calls):
    def metric(model, loader):
        calls.append(1)
        return 0.5
    return metric


@pytest.mark.parametrize("kwargs,needle", [
    (dict(num_iters=0), "num_iters"),
    (dict(num_iters=10**12), "num_iters"),
    (dict(start_lr=-1.0), "start_lr"),
    (dict(end_lr=float("inf")), "end_lr"),
    (dict(diverge=float("nan")), "diverge"),
    (dict(accumulate=0), "accumulate"),
    (dict(eval_every=5), "val_loader"),
    (dict(bounds_rule="magic"), "bounds_rule"),
    (dict(sweep="cosine"), "sweep"),
    (dict(loss_fn=None), "loss_fn"),  # dict batches need a loss_fn
])
def test_bad_input_is_one_line_and_changes_nothing(tracking, kwargs, needle):
    model, opt = regression_setup()
    before = state_of(model, opt)
    args = dict(loss_fn=lambda m, b: F.mse_loss(m(b["features"]), b["target"])) | kwargs
    with pytest.raises((ValueError, TypeError), match=needle):
        clr_mlflow.lr_find(model, opt, dict_batches(), **args)
    assert_restored(model, opt, before)
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_a_short_loader_cycles_for_the_steps_asked_for(tracking):
    """The minimum is on optimizer steps, not on the loader's length: 3 batches, 40 steps."""
    model, opt = regression_setup()
    seen = []

    def loss_fn(m, batch):
        if torch.is_grad_enabled():
            seen.append(batch["target"][0].item())
        return F.mse_loss(m(batch["features"]), batch["target"])

    batches = dict_batches(3)
    result = clr_mlflow.lr_find(model, opt, batches, loss_fn=loss_fn, num_iters=40, end_lr=1e-2, diverge=1e9,
                                progress=False)
    assert len(result.lrs) == 40 and len(seen) == 40
    assert seen == [b["target"][0].item() for b in batches] * 13 + [batches[0]["target"][0].item()]
    assert len(MlflowClient().get_metric_history(result.run_id, "range_test/loss")) == 40


def test_fewer_than_ten_steps_are_refused_before_anything_is_written(tracking):
    model, opt = regression_setup()
    with pytest.raises(ValueError, match=r"^Expected integer in \[10, 10,000,000\] .* for num_iters, but got 9"):
        clr_mlflow.lr_find(model, opt, dict_batches(12), loss_fn=lambda m, b: m(b["features"]).mean(), num_iters=9)
    assert opt.param_groups[0]["lr"] == 1e-3 and mlflow.search_runs(search_all_experiments=True).empty


# clr_scheduler ------------------------------------------------------------------------------

def formula(t, base, top, step, mode, gamma=1.0):
    cycle = np.floor(1 + t / (2 * step))
    x = np.abs(t / step - 2 * cycle + 1)
    scale = {"triangular": 1.0, "triangular2": 1 / 2 ** (cycle - 1), "exp_range": gamma**t}[mode]
    return base + (top - base) * np.maximum(0, 1 - x) * scale


@pytest.mark.parametrize("mode,gamma", [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.999)])
def test_clr_scheduler_matches_the_formula_and_torch_for_every_group(mode, gamma):
    model = Regressor()
    opt = torch.optim.AdamW([{"params": model.body.parameters(), "lr": 1e-3},
                             {"params": model.head.parameters(), "lr": 3e-3}])
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = clr_mlflow.clr_scheduler(opt, mode, 1e-3, 6e-3, step_size=7, gamma=gamma)
    ref = torch.optim.lr_scheduler.CyclicLR(ref_opt, 1e-3, 6e-3, step_size_up=7, mode=mode, gamma=gamma,
                                            cycle_momentum=False)
    ours, theirs = [], []
    for _ in range(50):
        ours.append(sched.get_last_lr())
        theirs.append(ref.get_last_lr()[0])
        opt.step()
        sched.step()
        ref_opt.step()
        ref.step()
    ours = np.array(ours)
    np.testing.assert_allclose(ours[:, 0], formula(np.arange(50), 1e-3, 6e-3, 7, mode, gamma), rtol=1e-12)
    np.testing.assert_allclose(ours[:, 0], theirs, rtol=1e-9)
    np.testing.assert_allclose(ours[:, 1], 3 * ours[:, 0], rtol=1e-12)
    assert opt.param_groups[1]["lr"] == pytest.approx(3 * opt.param_groups[0]["lr"])


def test_clr_scheduler_takes_tensor_lrs_as_torch_does():
    """torch optimizers take a 0-dim tensor lr (capturable / compiled steps): the checks take
    it too, and the tensor is filled in place with the formula's lr."""
    opt = torch.optim.Adam(Regressor().parameters(), lr=torch.tensor(1e-3))
    sched = clr_mlflow.clr_scheduler(opt, "triangular", torch.tensor(1e-3), 6e-3, step_size=5)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"].item())
        opt.step()
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    np.testing.assert_allclose(lrs, formula(np.arange(12), 1e-3, 6e-3, 5, "triangular"), rtol=1e-6)


def test_clr_scheduler_state_dict_and_pickle_round_trip():
    model = Regressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = clr_mlflow.clr_scheduler(opt, "one_cycle", 0.01, 0.1, total_iters=40, cycle_momentum=True)
    for _ in range(13):
        opt.step()
        sched.step()
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    opt2 = torch.optim.SGD(Regressor().parameters(), lr=0.1, momentum=0.9)
    other = clr_mlflow.clr_scheduler(opt2, "one_cycle", 0.01, 0.1, total_iters=40)
    other.load_state_dict(state)
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        other.step()
        assert other.get_last_lr() == sched.get_last_lr()
    assert pickle.loads(pickle.dumps(sched.schedule)) == sched.schedule


@pytest.mark.parametrize("args,kwargs,needle", [
    (("cosine", 0.1, 1.0), dict(step_size=10), "policy"),
    (("triangular", 0.1, 1.0), dict(), "step_size"),
    (("triangular", -0.1, 1.0), dict(step_size=10), "base_lr"),
    (("triangular", 0.1, 0.01), dict(step_size=10), "max_lr"),
    (("one_cycle", 0.1, 1.0), dict(), "total_iters"),
    (("exp_range", 0.1, 1.0), dict(step_size=10, gamma=2.0), "gamma"),
    (("one_cycle", 0.1, 0.1), dict(total_iters=40), "max_lr"),  # a zero-height cycle would divide by zero
    (("triangular", 0.1, 1.0), dict(step_size=True), "step_size"),
    (("one_cycle", 0.1, 1.0), dict(total_iters=40, anneal_div=float("inf")), "anneal_div"),
    # not numbers at all: the same one line, not a TypeError from a comparison
    (("triangular", "0.1", 1.0), dict(step_size=10), "base_lr"),
    (("exp_range", 0.1, 1.0), dict(step_size=10, gamma=None), "gamma"),
    (("one_cycle", 0.1, 1.0), dict(total_iters=True), "total_iters"),
    (("one_cycle", 0.1, 1.0), dict(total_iters=40, anneal_frac=float("nan")), "anneal_frac"),
    (("triangular", 0.1, 1.0), dict(step_size=10, cycle_momentum=True, base_momentum="0.8"), "base_momentum"),
])
def test_clr_scheduler_rejects_bad_arguments_before_touching_the_optimizer(args, kwargs, needle):
    opt = torch.optim.SGD(Regressor().parameters(), lr=0.5)
    with pytest.raises(ValueError, match=needle):
        clr_mlflow.clr_scheduler(opt, *args, **kwargs)
    assert opt.param_groups[0]["lr"] == 0.5 and "initial_lr" not in opt.param_groups[0]


# IterationLogger ----------------------------------------------------------------------------

def test_iteration_logger_takes_tensors_and_floats_in_the_users_loop(tracking):
    losses = torch.linspace(2.0, 0.5, 150)
    with mlflow.start_run() as run:
        with clr_mlflow.IterationLogger(prefix="train/", sync_every=32) as log:
            for step in range(150):
                loss = losses[step].clone()  # a 0-dim tensor, as a loop produces it
                log.log(step, lr=0.01 * step, loss=loss)
        with clr_mlflow.IterationLogger(run.info.run_id, prefix="thin/", log_every=10) as log:
            for step in range(95):
                log.log(step, value=torch.tensor(float(step)))
    steps, lr = history(run.info.run_id, "train/lr")
    np.testing.assert_array_equal(steps, np.arange(150))
    np.testing.assert_allclose(lr, 0.01 * np.arange(150), rtol=1e-12)
    np.testing.assert_array_equal(history(run.info.run_id, "train/loss")[1], losses.double().numpy())
    steps, values = history(run.info.run_id, "thin/value")
    assert list(steps) == list(range(0, 95, 10)) and list(values) == list(range(0, 95, 10))


def test_iteration_logger_flushes_on_ctrl_c_and_needs_a_run(tracking):
    with pytest.raises(ValueError, match="active MLflow run"):
        clr_mlflow.IterationLogger()
    with pytest.raises(KeyboardInterrupt):
        with mlflow.start_run() as run, clr_mlflow.IterationLogger() as log:
            for step in range(23):
                log.log(step, loss=torch.tensor(step / 2))
            raise KeyboardInterrupt
    steps, values = history(run.info.run_id, "loss")
    assert list(steps) == list(range(23)) and list(values) == [s / 2 for s in range(23)]


def test_the_readme_example_runs_as_written(tracking, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## Use it on your own model", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    MlflowClient().search_experiments()  # create the store before the child opens it
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "valley" in res.stdout and (tmp_path / "lr_find.png").stat().st_size > 10_000
    run = mlflow.search_runs(experiment_names=["my_project"]).iloc[0]
    assert run["status"] == "FINISHED" and run["tags.clr_mlflow.kind"] == "range_test"
    assert len(history(run["run_id"], "train/lr")[0]) == 8 * 32
    assert len(history(run["run_id"], "range_test/lr")[0]) == run["metrics.range_test/iterations"]


def test_three_seeds_give_median_bounds_with_their_spread(tracking):
    from torch.utils.data import DataLoader

    from clr_mlflow.core.bounds import bounds_frame, suggest_bounds

    def loss_fn(m, b):
        return F.mse_loss(m(b["features"]), b["target"])

    whole = dict_batches(1, size=320, seed=3)[0]
    items = [{"features": f, "target": t} for f, t in zip(whole["features"], whole["target"])]

    def setup():  # a DataLoader of dict items: each seed draws its own data order
        model, opt = regression_setup(3)
        return model, opt, DataLoader(items, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))

    model, opt, batches = setup()
    before = state_of(model, opt)
    args = dict(loss_fn=loss_fn, num_iters=40, start_lr=1e-4, end_lr=0.5, bounds_rule="valley")
    result = clr_mlflow.lr_find(model, opt, batches, seeds=3, progress=False, **args)
    assert_restored(model, opt, before)
    seeds = result.seed_results
    assert [r.seed for r in seeds] == [0, 1, 2] and len({r.losses[0] for r in seeds}) == 3  # three initialisations
    single = clr_mlflow.lr_find(*setup(), track=False, progress=False, **args)
    np.testing.assert_array_equal(single.losses, seeds[0].losses)  # seed 0 is the model as given
    # the table against the rules run seed by seed
    table = result.bounds.set_index("rule")
    per_seed = [bounds_frame(suggest_bounds(r.lrs, r.smoothed), "valley").set_index("rule") for r in seeds]
    for rule in ("min_div10", "steepest", "loss_edge", "valley"):
        tops = np.array([t.loc[rule, "max_lr"] for t in per_seed])
        ok = np.isfinite(tops)
        assert table.loc[rule, "seeds"] == ok.sum()
        assert table.loc[rule, "max_lr"] == pytest.approx(np.median(tops[ok]))
        assert (table.loc[rule, "max_lr_min"], table.loc[rule, "max_lr_max"]) == pytest.approx(
            (tops[ok].min(), tops[ok].max()))
    assert table.loc["accuracy", "seeds"] == 0 and np.isnan(table.loc["accuracy", "max_lr"])
    assert result.suggest() == (table.loc["valley", "base_lr"], table.loc["valley", "max_lr"])
    # MLflow: seed 0's series as usual, every seed's smoothed loss, a curve.csv with a seed column
    for k, r in enumerate(seeds):
        steps, values = history(result.run_id, f"range_test/seed{k}/smoothed_loss")
        np.testing.assert_array_equal(steps, np.arange(len(r.lrs)))
        np.testing.assert_allclose(values, r.smoothed, rtol=1e-12)
    np.testing.assert_allclose(history(result.run_id, "range_test/loss")[1], seeds[0].losses, rtol=1e-12)
    import pandas as pd

    csv = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="range_test/curve.csv"))
    assert csv.groupby("seed").size().to_dict() == {k: len(r.lrs) for k, r in enumerate(seeds)}
    assert MlflowClient().get_run(result.run_id).data.params["range_test.seeds"] == "3"
    # the plot: the median smoothed curve with its min-max band over the seeds
    band = result.band()
    np.testing.assert_allclose(band["median"].iloc[:10], np.median([r.smoothed[:10] for r in seeds], axis=0))
    assert (band["low"] <= band["median"]).all() and (band["median"] <= band["high"]).all()
    ax = result.plot().axes[0]
    assert any(c.get_label() == "smoothed loss, min-max over 3 seeds" for c in ax.collections)
    assert any(line.get_label() == "median smoothed loss (3 seeds)" for line in ax.lines)


def test_iteration_logger_flushes_on_time_in_a_slow_loop(tracking):
    import time

    with mlflow.start_run() as run, clr_mlflow.IterationLogger(flush_seconds=0.05) as log:
        for step in range(3):
            log.log(step, loss=torch.tensor(float(step)))
            time.sleep(0.1)
        for _ in range(100):  # the background write lands while the loop goes on
            if len(history(run.info.run_id, "loss")[0]) >= 2:
                break
            time.sleep(0.05)
        assert list(history(run.info.run_id, "loss")[0])[:2] == [0, 1]  # before the logger is closed
