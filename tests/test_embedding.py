"""The public API as a guest in a user's program: lr_find, clr_scheduler and IterationLogger
change nothing there but what they promise (the lr, the MLflow records). Each test runs a
small "user program" and compares its whole state before and after, on a normal end, on an
error and on Ctrl-C; then the odd inputs users bring (losses of any sign and scale, outputs
carrying a loss, targets the default loss cannot read)."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

import clr_mlflow
from clr_mlflow.tracking import compat, delivery, spool
from clr_mlflow.tracking import runs as tracking_runs


class Net(nn.Module):
    """A regression net with a BatchNorm the user froze (fine-tuning) and dropout."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.body(x)).squeeze(1)


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 1)


def user_program(seed=0):
    """What a user has set up before calling us: a partly frozen model in train mode, an
    optimizer with state, grads left from their own step on some parameters (None on others),
    a shuffling DataLoader with its own generator, a GradScaler, seeded RNGs."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = Net().train()
    model.body[1].eval()  # the frozen BatchNorm
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = data()[:16]
    F.mse_loss(model(x), y).backward()
    opt.step()
    model.head.weight.grad = None  # some grads None, others kept
    loader = torch.utils.data.DataLoader(data(), batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(7))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, loader, scaler


def snapshot(model, opt, loader, scaler):
    """Everything the program owns that lr_find could touch."""
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [(name, m.training) for name, m in model.named_modules()],
        "grads": [(n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        "optimizer": repr(opt.state_dict()),
        "opt_tensors": [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)],
        "rng": (random.getstate(), repr(np.random.get_state()), torch.get_rng_state().clone()),
        "loader_rng": loader.generator.get_state().clone(),
        "scaler": scaler.state_dict(),
        "rc": dict(matplotlib.rcParams),
        "backend": matplotlib.get_backend(),
        # MLflow's own bookkeeping is left out: its telemetry client sets or unsets
        # _MLFLOW_TELEMETRY_SESSION_ID whenever it (re)starts, for any mlflow user.
        "env": {k: v for k, v in os.environ.items() if not k.startswith("_MLFLOW_")},
        "uri": mlflow.get_tracking_uri(),
        "active": mlflow.active_run() and mlflow.active_run().info.run_id,
        "cwd": sorted(p.name for p in Path.cwd().iterdir()),
    }


def assert_same(before, after):
    for k, v in before["weights"].items():
        assert torch.equal(v, after["weights"][k]), k
    assert after["modes"] == before["modes"]
    for (name, g0), (_, g1) in zip(before["grads"], after["grads"]):
        assert (g0 is None and g1 is None) or (g0 is not None and g1 is not None and torch.equal(g0, g1)), name
    assert after["optimizer"] == before["optimizer"]
    assert all(torch.equal(a, b) for a, b in zip(before["opt_tensors"], after["opt_tensors"]))
    assert after["rng"][0] == before["rng"][0] and after["rng"][1] == before["rng"][1]
    assert torch.equal(after["rng"][2], before["rng"][2])
    assert torch.equal(after["loader_rng"], before["loader_rng"])
    assert after["scaler"] == before["scaler"]
    changed_rc = [k for k, v in before["rc"].items() if str(after["rc"].get(k)) != str(v)]
    assert changed_rc == [] and after["backend"] == before["backend"]
    assert after["env"] == before["env"]
    assert after["uri"] == before["uri"] and after["active"] == before["active"]
    assert after["cwd"] == before["cwd"]


def our_threads(before=None):
    """Our threads alive now; with `before` (an earlier call's), those started since, once
    the deadline threads among them have finished the call they returned from."""
    now = {t for t in threading.enumerate() if t.name.startswith("clr_mlflow")}
    if before is None:
        return now
    for t in now - before:
        if t.name.startswith("clr_mlflow-write"):
            t.join(30)  # a deadline thread after its call returned: it ends by itself
    return sorted(t.name for t in now - before if t.is_alive())


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def failing_at(step, error):
    calls = []

    def loss_fn(model, batch):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == step:
                raise error
        return mse(model, batch)
    return loss_fn


@pytest.mark.parametrize("ending", ["normal", "error", "ctrl-c"])
def test_the_user_program_is_left_exactly_as_it_was(tracking, ending, tmp_path, monkeypatch):
    MlflowClient().search_experiments()  # the user's store exists (its ./mlruns is the store's, made here)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # the program's own working directory: nothing may appear in it
    with mlflow.start_run() as own:  # the caller's own last run: still theirs after lr_find
        pass
    model, opt, loader, scaler = user_program()
    before = snapshot(model, opt, loader, scaler)
    threads = our_threads()
    kwargs = dict(num_iters=30, start_lr=1e-5, end_lr=1e-1, scaler=scaler, progress=False)
    if ending == "normal":
        result = clr_mlflow.lr_find(model, opt, loader, loss_fn=mse, **kwargs)
        status = "FINISHED"
        assert result.run_id is not None and len(result.lrs) > 10
    else:
        error = RuntimeError("user's bug") if ending == "error" else KeyboardInterrupt()
        with pytest.raises(type(error)):
            clr_mlflow.lr_find(model, opt, loader, loss_fn=failing_at(12, error), **kwargs)
        status = "FAILED" if ending == "error" else "KILLED"
    assert_same(before, snapshot(model, opt, loader, scaler))
    assert our_threads(threads) == []
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_id != '{own.info.run_id}'")
    assert list(runs["status"]) == [status]  # our own run, ended by id; the caller's stack never had it
    assert mlflow.last_active_run().info.run_id == own.info.run_id
    assert not (spool.spool_root() / runs["run_id"][0]).exists()  # delivered: the spool folder went


def test_inside_the_users_own_run_lr_find_logs_there_and_leaves_it_open(tracking):
    model, opt, loader, scaler = user_program()
    with mlflow.start_run() as user_run:
        mlflow.log_param("num_iters", 5)  # the user's own param of that name: ours are namespaced
        result = clr_mlflow.lr_find(model, opt, loader, loss_fn=mse, num_iters=20, end_lr=1e-1, progress=False)
        assert mlflow.active_run().info.run_id == user_run.info.run_id
        assert MlflowClient().get_run(user_run.info.run_id).info.status == "RUNNING"
    run = MlflowClient().get_run(result.run_id)
    assert result.run_id == user_run.info.run_id
    params = run.data.params
    assert params["num_iters"] == "5" and params["range_test.num_iters"] == "20"
    assert params["range_test.optimizer"] == "SGD" and params["range_test.optimizer.lrs"] == "0.001"
    assert params["range_test.model"] == "Net" and params["range_test.model.parameters"] == str(
        sum(p.numel() for p in model.parameters()))
    assert params["range_test.device"] == "cpu" and params["range_test.amp"] == "none"
    assert params["range_test.loss_fn"] == "mse" and params["range_test.accumulate"] == "1"
    assert run.data.tags["clr_mlflow.torch"] == torch.__version__
    for row in result.bounds.itertuples():  # every rule's answer, chartable across runs
        if np.isfinite(row.max_lr):
            assert run.data.metrics[f"bounds/{row.rule}/max_lr"] == pytest.approx(row.max_lr)
            assert run.data.metrics[f"bounds/{row.rule}/base_lr"] == pytest.approx(row.base_lr)


def test_a_clashing_param_sends_the_range_test_to_a_child_run_and_keeps_the_users(tracking):
    model, opt, loader, _ = user_program()
    with mlflow.start_run() as user_run:
        mlflow.log_param("range_test.num_iters", 5)
        result = clr_mlflow.lr_find(model, opt, loader, loss_fn=mse, num_iters=20, end_lr=1e-1, progress=False)
        assert mlflow.active_run().info.run_id == user_run.info.run_id
    child = MlflowClient().get_run(result.run_id)
    assert result.run_id != user_run.info.run_id and child.data.tags["mlflow.parentRunId"] == user_run.info.run_id
    assert child.data.params["range_test.num_iters"] == "20" and child.info.status == "FINISHED"
    assert MlflowClient().get_run(user_run.info.run_id).data.params["range_test.num_iters"] == "5"


def test_a_new_run_lands_in_the_experiment_the_user_set_without_touching_the_stack(tracking):
    """compat.start_detached_run: made as the caller's start_run would, off its stack."""
    mlflow.set_experiment("users_exp")
    with mlflow.start_run() as outer:
        run_id = compat.start_detached_run("detached", {"k": "v"})
        assert mlflow.active_run().info.run_id == outer.info.run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.experiment_id == mlflow.get_experiment_by_name("users_exp").experiment_id
    assert run.data.tags["k"] == "v" and "mlflow.parentRunId" not in run.data.tags


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_applications_run_leaves_the_stack_even_when_the_store_is_gone(tracking, monkeypatch):
    """compat.leave_fluent_run relies on mlflow.end_run popping the run before it calls the
    store: pinned here, with the store switched to a port where nothing listens."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = mlflow.start_run()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{closed_port()}")
    compat.leave_fluent_run(run.info.run_id, "FINISHED")
    assert mlflow.active_run() is None


def test_a_write_that_hangs_is_an_outage_after_the_deadline(tracking, monkeypatch, tmp_path):
    """A store that accepts the connection and never answers: the caller's write returns at
    the deadline (MLflow's own timeout is 120 s, with retries) and the op is spooled."""
    monkeypatch.setattr(delivery, "WRITE_DEADLINE", 0.5)
    monkeypatch.setenv("CLR_MLFLOW_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the abandoned call ends soon after the test
    run_id = MlflowClient().create_run("0").info.run_id
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mlflow.set_tracking_uri(f"http://127.0.0.1:{silent.getsockname()[1]}")
        delivered = delivery.deliver(run_id, "params", {"params": {"a": "1"}})
        assert delivered is False
        entries = spool.read_journal(tmp_path / "spool" / run_id)
        assert [(e["op"], e["params"]) for e in entries] == [("params", {"a": "1"})]
        spool.get(run_id).release()


def test_importing_the_package_loads_nothing_heavy_and_changes_no_global_state():
    # (reading rcParams['backend'] itself imports pyplot, so the modules are listed first)
    code = ("import sys, os; env = dict(os.environ)\n"
            "import clr_mlflow\n"
            "heavy = [m for m in ('mlflow', 'pandas', 'seaborn', 'matplotlib', 'ray', 'torch') if m in sys.modules]\n"
            "assert dict(os.environ) == env\n"
            "clr_mlflow.clr_scheduler\n"
            "heavy += [m for m in ('mlflow', 'pandas', 'seaborn', 'matplotlib') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_plot_draws_into_the_callers_axes_and_leaves_rcparams_alone():
    from matplotlib.figure import Figure

    model, opt, loader, _ = user_program()
    result = clr_mlflow.lr_find(model, opt, loader, loss_fn=mse, num_iters=20, end_lr=1e-1, track=False,
                                progress=False)
    rc = dict(matplotlib.rcParams)
    fig = Figure()
    ax, other = fig.subplots(1, 2)
    assert result.plot(ax=ax) is fig
    assert len(ax.lines) >= 2 and len(other.lines) == 0
    own = result.plot()
    assert isinstance(own, Figure) and own is not fig
    assert {k: str(v) for k, v in matplotlib.rcParams.items()} == {k: str(v) for k, v in rc.items()}


# Any loss, any output --------------------------------------------------------------------

def regression(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    batches = [(x, y[:, None]) for x, y in torch.utils.data.DataLoader(data(256, seed), batch_size=16)]
    return model, batches


def shifted(scale, shift):
    return lambda model, batch: scale * F.mse_loss(model(batch[0]), batch[1]) + shift


def test_a_loss_shifted_by_a_constant_stops_and_suggests_exactly_as_the_loss_itself():
    """Same gradients, so the same steps: the stop and every bound must be the same whether
    the loss carries -1 (negative from the start), +100, or nothing."""
    results = {}
    for shift in (0.0, -1.0, 100.0):
        model, batches = regression()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        results[shift] = clr_mlflow.lr_find(model, opt, batches, loss_fn=shifted(1.0, shift), num_iters=80,
                                            start_lr=1e-5, end_lr=10, track=False, progress=False)
    ref = results[0.0]
    assert "diverged" in ref.stop_reason or "not finite" in ref.stop_reason
    for shift, got in results.items():
        assert len(got.lrs) == len(ref.lrs), shift
        assert got.bounds[["rule", "base_lr", "max_lr"]].equals(ref.bounds[["rule", "base_lr", "max_lr"]]), shift


def test_a_loss_in_other_units_stops_and_suggests_as_the_loss_itself():
    """x 1e-3 with Adam (whose steps do not depend on the loss's scale): same stop, same bounds."""
    results = {}
    for scale in (1.0, 1e-3):
        model, batches = regression()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-12)
        results[scale] = clr_mlflow.lr_find(model, opt, batches, loss_fn=shifted(scale, 0.0), num_iters=80,
                                            start_lr=1e-5, end_lr=10, track=False, progress=False)
    ref, got = results[1.0], results[1e-3]
    assert len(got.lrs) == len(ref.lrs)
    assert got.bounds[["rule", "max_lr"]].equals(ref.bounds[["rule", "max_lr"]])


def test_a_loss_that_never_changes_is_a_flat_row_never_a_suggestion():
    model, batches = regression()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    result = clr_mlflow.lr_find(model, opt, batches, loss_fn=lambda m, b: (m(b[0]) * 0).sum() + 2.0, num_iters=30,
                                track=False, progress=False)
    loss_rows = result.bounds[result.bounds["rule"] != "accuracy"]
    assert loss_rows["note"].str.startswith("flat").all()
    with pytest.raises(ValueError, match="flat"):
        result.suggest()


class Output(dict):
    """A Hugging Face-like ModelOutput: a mapping with attribute access."""
    __getattr__ = dict.get


@pytest.mark.parametrize("wrap", [lambda loss, out: {"loss": loss, "logits": out},
                                  lambda loss, out: Output(loss=loss, logits=out)])
def test_an_output_carrying_a_loss_uses_that_loss_and_ignores_the_rest(wrap):
    model, batches = regression()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def loss_fn(m, b):
        out = m(b[0])
        return wrap(F.mse_loss(out, b[1]), out)

    got = clr_mlflow.lr_find(model, opt, batches, loss_fn=loss_fn, num_iters=20, end_lr=1e-2, track=False,
                             progress=False)
    model2, _ = regression()
    ref = clr_mlflow.lr_find(model2, torch.optim.SGD(model2.parameters(), lr=1e-3), batches, loss_fn=shifted(1, 0),
                             num_iters=20, end_lr=1e-2, track=False, progress=False)
    np.testing.assert_array_equal(got.losses, ref.losses)
    assert got.terms == {}


@pytest.mark.parametrize("loss_fn, needle", [
    (lambda m, b: {"logits": m(b[0])}, "non-scalar logits: (16, 1)"),
    (lambda m, b: {"loss": m(b[0])}, "carries to be a scalar tensor, but got loss: (16, 1)"),
    (lambda m, b: m(b[0]), "but got Tensor of shape (16, 1)"),
    (lambda m, b: "0.5", "but got str"),
])
def test_an_output_that_is_no_loss_is_one_line_before_any_step_or_run(tracking, loss_fn, needle):
    model, batches = regression()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError) as info:
        clr_mlflow.lr_find(model, opt, batches, loss_fn=loss_fn, num_iters=20, progress=False)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert mlflow.search_runs(search_all_experiments=True).empty


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.fc(x)}


@pytest.mark.parametrize("make, needle", [
    (lambda: (nn.Linear(4, 1), [(torch.randn(8, 4), torch.randn(8, 1))] * 12), "integer class targets"),
    (lambda: (DictNet(), [(torch.randn(8, 4), torch.randint(0, 3, (8,)))] * 12), "logits tensor"),
    (lambda: (nn.Linear(4, 3), [(torch.randn(8, 4), torch.randint(0, 3, (6,)))] * 12), "logits (8, 3)"),
])
def test_the_default_loss_refuses_batches_it_cannot_read_before_anything_runs(tracking, make, needle):
    model, batches = make()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises((TypeError, ValueError)) as info:
        clr_mlflow.lr_find(model, opt, batches, num_iters=10, progress=False)
    assert needle in str(info.value) and "pass loss_fn" in str(info.value)
    assert mlflow.search_runs(search_all_experiments=True).empty


# IterationLogger ---------------------------------------------------------------------------

def test_iteration_logger_refuses_a_non_scalar_at_the_call_and_names_run_id_without_a_run(tracking):
    with pytest.raises(ValueError, match=r"run_id=trainer\.logger\.run_id"):
        clr_mlflow.IterationLogger()
    run_id = MlflowClient().create_run("0").info.run_id
    threads = our_threads()
    logger = clr_mlflow.IterationLogger(run_id)
    logger.log(0, loss=torch.tensor(1.0), lr=0.1)
    with pytest.raises(ValueError, match=r"IterationLogger.log\(loss=\.\.\.\), but got a tensor of shape \(2,\)"):
        logger.log(1, loss=torch.ones(2))
    with pytest.raises(ValueError, match="but got str"):
        logger.log(1, loss="high")
    logger.close()
    assert our_threads(threads) == []
    steps = [m.step for m in MlflowClient().get_metric_history(run_id, "loss")]
    assert steps == [0]


def test_iteration_logger_closing_after_a_failed_device_copy_leaks_no_thread_nor_spool(tracking):
    """A value whose copy to the host fails at close (a tensor that is already gone from
    its graph is fine; a deleted storage is not): the writer stops and the spool is let go."""
    run_id = MlflowClient().create_run("0").info.run_id
    threads = our_threads()
    logger = clr_mlflow.IterationLogger(run_id)
    logger.log(0, loss=1.0)
    logger.logged["bad"] = ([1], [object()])  # what a broken device copy leaves behind
    with pytest.raises(TypeError):
        logger.close()
    assert our_threads(threads) == []
    assert spool.get(run_id) is None or spool.get(run_id).holders == 0
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "loss")] == [0]


def test_the_package_uses_no_private_mlflow_name():
    """No `_`-prefixed MLflow name: they change in minor releases (compat.py holds the public
    ways round what MLflow does not offer)."""
    import re

    private = re.compile(r"mlflow[\w.]*\._(?!_)\w|from mlflow[\w.]* import [^\n]*\b_\w|fluent\._")
    package = Path(clr_mlflow.__file__).parent
    offenders = [f"{p.relative_to(package)}: {m.group(0)}" for p in package.rglob("*.py")
                 for m in private.finditer(p.read_text())]
    assert offenders == []


def test_fresh_run_names_leave_the_callers_random_state_alone():
    random.seed(3)
    state = random.getstate()
    names = {tracking_runs.fresh_run_name() for _ in range(20)}
    assert random.getstate() == state and len(names) > 1


# Short loaders in the CLI ---------------------------------------------------------------

def test_the_clis_range_test_on_a_small_folder_runs_num_iters_across_epochs(tracking, tmp_path):
    """3 classes x 6 images, batch 4: 4 batches an epoch (val_fraction 0), 25 iterations."""
    from clr_mlflow.app.config import Config, ConfigError
    from clr_mlflow.app.runner import execute
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "imgs", size=12)
    base = dict(data=str(root), data_dir=str(tmp_path / "cache"), image_size=16, batch_size=4, val_fraction=0.0,
                device="cpu", model="small_cnn", lr_start=1e-4, lr_end=1.0, diverge=1e9, experiment="small")
    out = execute(Config(**base, num_iters=25), "range-test")
    steps = [m.step for m in MlflowClient().get_metric_history(out.run_id, "range_test/lr")]
    assert sorted(steps) == list(range(25))
    with pytest.raises(ConfigError, match=r"one-epoch range test \(num_iters=0\).*set num_iters"):
        execute(Config(**base, num_iters=0), "range-test")
