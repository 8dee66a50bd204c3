"""Bad input to the Python API: the rest of the bad-input table (test_bad_inputs.py has the
commands'). Each row is a call, the exception it raises and its exact message: one line
naming the argument, raised before anything is stepped, opened or logged (no run in the
store, nothing in the working folder, the model's weights as they were).

Names a row can use: model, opt (SGD over it, lr 0.1), loader (four (x, y) batches), H (a
well-formed run id), result (a RangeTestResult of model), tb(...) (tune_bounds on model's
kind with the other arguments valid) and log (an IterationLogger on a fresh run, whose rows
also check that the run got no metric)."""
import contextlib
import dataclasses
import os
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from clr_mlflow import IterationLogger, clr_scheduler, lr_find, tune_bounds

H = "0123456789abcdef" * 2
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
POLICY = "one of triangular, triangular2, exp_range, one_cycle, fixed"
RULES = "min_div10, steepest, loss_edge, accuracy, valley, slide"
LOSS = "Expected loss_fn to return a scalar loss, a dict of scalar losses or an output with a 'loss', but got "
NUM_ITERS = "Expected integer in [10, 10,000,000] (optimizer steps; a shorter loader starts again) for " \
            "num_iters, but got "
TB_RULES = f"Expected a non-empty list of distinct rules from {RULES} as rules, but got "
VALUE = "Expected a number or a one-element tensor for IterationLogger.log(loss=...), but got "
DEVICE = "Expected None, a torch.device or a device name such as 'cpu' or 'cuda:0' as device, but got "


def row(call, error, line, marks=()):
    return pytest.param(call, error, line, marks=marks, id=call)


def lf(**kw):
    return f"lr_find(model, opt, loader, track=False, progress=False, {', '.join(f'{k}={v}' for k, v in kw.items())})"


def cs(args):
    return f"clr_scheduler(opt, {args})"


CASES = [
    # lr_find
    row("lr_find('model', opt, loader)", ValueError, "Expected a torch.nn.Module as model, but got 'str'"),
    row("lr_find(model, 'sgd', loader)", ValueError, "Expected a torch.optim.Optimizer as optimizer, but got 'str'"),
    row("lr_find(model, opt, 5)", ValueError, "Expected an iterable of batches as loader, but got 'int'"),
    row("lr_find(model, opt, [], track=False, progress=False)", ValueError,
        "Expected loader to yield batches, but it yielded none"),
    row("lr_find(model, torch.optim.SGD(model.parameters(), lr=0.0), loader)", ValueError,
        "Expected positive (other groups are swept in proportion to it) optimizer.param_groups[0]['lr'], but got 0.0"),
    row(lf(start_lr=0), ValueError, "Expected positive finite start_lr, but got 0"),
    row(lf(start_lr=-1), ValueError, "Expected positive finite start_lr, but got -1"),
    row(lf(start_lr="float('nan')"), ValueError, "Expected positive finite start_lr, but got nan"),
    row(lf(start_lr="'1e-3'"), ValueError, "Expected positive finite start_lr, but got '1e-3'"),
    row(lf(start_lr=1, end_lr=1), ValueError, "Expected finite value > start_lr=1 for end_lr, but got 1"),
    row(lf(end_lr="float('inf')"), ValueError, "Expected finite value > start_lr=1e-07 for end_lr, but got inf"),
    row(lf(num_iters=9), ValueError, NUM_ITERS + "9"),
    row(lf(num_iters=10.5), ValueError, NUM_ITERS + "10.5"),
    row(lf(num_iters=True), ValueError, NUM_ITERS + "True"),
    row(lf(num_iters=10**8), ValueError, NUM_ITERS + "100000000"),
    row(lf(sweep="'log'"), ValueError, "Expected one of exp, linear for sweep, but got 'log'"),
    row(lf(beta=1), ValueError, "Expected value in [0, 1) for beta, but got 1"),
    row(lf(beta=-0.1), ValueError, "Expected value in [0, 1) for beta, but got -0.1"),
    row(lf(beta="float('nan')"), ValueError, "Expected value in [0, 1) for beta, but got nan"),
    row(lf(diverge=1), ValueError, "Expected finite value > 1 for diverge, but got 1"),
    row(lf(diverge="float('inf')"), ValueError, "Expected finite value > 1 for diverge, but got inf"),
    row(lf(accumulate=0), ValueError, "Expected positive integer accumulate, but got 0"),
    row(lf(accumulate=1.5), ValueError, "Expected positive integer accumulate, but got 1.5"),
    row(lf(eval_every=-1), ValueError, "Expected non-negative integer eval_every, but got -1"),
    row(lf(eval_every=5), ValueError, "Expected both val_loader and a positive eval_every, or neither, for val_loader, "
        "but got 5"),
    row(lf(val_loader="loader"), ValueError, "Expected both val_loader and a positive eval_every, or neither, for "
        "eval_every, but got 0"),
    row(lf(log_every=0), ValueError, "Expected positive integer log_every, but got 0"),
    row(lf(seeds=0), ValueError, "Expected integer in [1, 1000] for seeds, but got 0"),
    row(lf(seeds=1001), ValueError, "Expected integer in [1, 1000] for seeds, but got 1001"),
    row(lf(batched_seeds="'yes'"), ValueError, "Expected None, True or False as batched_seeds, but got 'yes'"),
    row(lf(metric_fn=3, val_loader="loader", eval_every=5), ValueError,
        "Expected a callable(model, val_loader) -> float as metric_fn, but got 3"),
    row(lf(bounds_rule="'median'"), ValueError, f"Expected one of {RULES} for bounds_rule, but got 'median'"),
    row(lf(bounds_rule="'accuracy'"), ValueError, "Expected a positive (bounds_rule=accuracy needs it) eval_every, but "
        "got 0"),
    row(lf(bounds_divisor=1), ValueError, "Expected finite value > 1 for bounds_divisor, but got 1"),
    row(lf(scaler="'x'"), ValueError, "Expected a torch.amp.GradScaler or None as scaler, but got 'x'"),
    row(lf(loss_fn=3), ValueError, "Expected None or a callable(model, batch) -> loss as loss_fn, but got 3"),
    row(lf(loss_fn="lambda m, b: 'loss'"), TypeError, LOSS + "str"),
    row(lf(loss_fn="lambda m, b: torch.ones(3)"), TypeError, LOSS + "Tensor of shape (3,)"),
    row("lr_find(model, opt, [torch.randn(8, 4)], track=False, progress=False)", TypeError,
        "Expected (inputs, targets) tensor batches for the default loss_fn (loss_fn=None), but got Tensor: pass "
        "loss_fn(model, batch) for other batch structures"),
    row(lf(amp="'bf16'"), ValueError, "Expected None or a torch.dtype (e.g. torch.bfloat16) as amp, but got 'bf16'"),
    row(lf(device="'tpu'"), ValueError, DEVICE + "'tpu'"),
    row(lf(device=3), ValueError, DEVICE + "3"),
    row(lf(device="'cuda'"), ValueError, "Expected an available device as device, but got 'cuda'", marks=no_cuda),
    row("lr_find(model, opt, loader, track='yes')", ValueError, "Expected True or False as track, but got 'yes'"),
    row("lr_find(model, opt, loader, progress='x')", ValueError, "Expected True or False as progress, but got 'x'"),
    # clr_scheduler
    row("clr_scheduler('opt', 'triangular', 0.01, 0.1, step_size=2)", ValueError,
        "Expected a torch.optim.Optimizer as optimizer, but got 'str'"),
    row("clr_scheduler(None, 'triangular', 0.01, 0.1, step_size=2)", ValueError,
        "Expected a torch.optim.Optimizer as optimizer, but got 'NoneType'"),
    row(cs("'cosine', 0.01, 0.1, step_size=2"), ValueError, f"Expected {POLICY} for policy, but got 'cosine'"),
    row(cs("'triangular', 0.1, 0.01, step_size=2"), ValueError,
        "Expected finite value >= base_lr=0.1 for max_lr, but got 0.01"),
    row(cs("'triangular', 0, 0.1, step_size=2"), ValueError, "Expected positive finite base_lr, but got 0"),
    row(cs("'triangular', float('nan'), 0.1, step_size=2"), ValueError,
        "Expected positive finite base_lr, but got nan"),
    row(cs("'triangular', '0.01', 0.1, step_size=2"), ValueError, "Expected positive finite base_lr, but got '0.01'"),
    row(cs("'triangular', True, 0.1, step_size=2"), ValueError, "Expected positive finite base_lr, but got True"),
    row(cs("'triangular', 0.01, float('inf'), step_size=2"), ValueError,
        "Expected finite value >= base_lr=0.01 for max_lr, but got inf"),
    row(cs("'triangular', 0.01, 0.1"), ValueError,
        "Expected positive integer (policy=triangular) step_size, but got None"),
    row(cs("'triangular2', 0.01, 0.1, step_size=0"), ValueError,
        "Expected positive integer (policy=triangular2) step_size, but got 0"),
    row(cs("'exp_range', 0.01, 0.1, step_size=-2"), ValueError,
        "Expected positive integer (policy=exp_range) step_size, but got -2"),
    row(cs("'triangular', 0.01, 0.1, step_size=2.5"), ValueError,
        "Expected positive integer (policy=triangular) step_size, but got 2.5"),
    row(cs("'one_cycle', 0.01, 0.1"), ValueError, "Expected integer >= 2 (policy=one_cycle) total_iters, but got None"),
    row(cs("'one_cycle', 0.01, 0.1, total_iters=1"), ValueError,
        "Expected integer >= 2 (policy=one_cycle) total_iters, but got 1"),
    row(cs("'one_cycle', 0.1, 0.1, total_iters=10"), ValueError,
        "Expected value > base_lr=0.1 (policy=one_cycle) for max_lr, but got 0.1"),
    row(cs("'exp_range', 0.01, 0.1, step_size=2, gamma=0"), ValueError,
        "Expected value in (0, 1] for gamma, but got 0"),
    row(cs("'exp_range', 0.01, 0.1, step_size=2, gamma=1.5"), ValueError,
        "Expected value in (0, 1] for gamma, but got 1.5"),
    row(cs("'exp_range', 0.01, 0.1, step_size=2, gamma=float('nan')"), ValueError,
        "Expected value in (0, 1] for gamma, but got nan"),
    row(cs("'one_cycle', 0.01, 0.1, total_iters=10, anneal_frac=1"), ValueError,
        "Expected value in [0, 1) for anneal_frac, but got 1"),
    row(cs("'one_cycle', 0.01, 0.1, total_iters=10, anneal_div=0.5"), ValueError,
        "Expected finite value >= 1 for anneal_div, but got 0.5"),
    row(cs("'triangular', 0.01, 0.1, step_size=2, cycle_momentum=True, base_momentum=0.95, max_momentum=0.85"),
        ValueError, "Expected 0 <= base < max < 1 for base_momentum/max_momentum, but got (0.95, 0.85)"),
    row(cs("'triangular', 0.01, 0.1, step_size=2, cycle_momentum='yes'"), ValueError,
        "Expected True or False as cycle_momentum, but got 'yes'"),
    row("clr_scheduler(torch.optim.SGD(model.parameters(), lr=0.0), 'fixed', 0.01, 0.01)", ValueError,
        "Expected positive (other groups keep their ratio to it) optimizer.param_groups[0]['lr'], but got 0.0"),
    # IterationLogger
    row("IterationLogger()", ValueError, "Expected run_id=... or an active MLflow run, but there is none: pass the "
        "run's id, e.g. IterationLogger(run_id=trainer.logger.run_id) under Lightning's MLFlowLogger, or log inside "
        "`with mlflow.start_run():`"),
    row("IterationLogger('nope')", ValueError,
        "Expected None or a run id of 32 lowercase hex characters as run_id, but got 'nope'"),
    row("IterationLogger(123)", ValueError, "Expected None or a run id of 32 lowercase hex characters as run_id, but "
        "got 123"),
    row("IterationLogger(H.upper())", ValueError, "Expected None or a run id of 32 lowercase hex characters as run_id, "
        f"but got '{H.upper()}'"),
    row("IterationLogger(H, prefix=3)", ValueError, "Expected a string as prefix, but got 3"),
    row("IterationLogger(H, log_every=0)", ValueError, "Expected positive integer log_every, but got 0"),
    row("IterationLogger(H, log_every=2.0)", ValueError, "Expected positive integer log_every, but got 2.0"),
    row("IterationLogger(H, flush_every=0)", ValueError, "Expected positive integer flush_every, but got 0"),
    row("IterationLogger(H, flush_seconds=-1)", ValueError, "Expected non-negative finite flush_seconds, but got -1"),
    row("IterationLogger(H, flush_seconds=float('nan'))", ValueError,
        "Expected non-negative finite flush_seconds, but got nan"),
    row("IterationLogger(H, sync_every=0)", ValueError, "Expected positive integer sync_every, but got 0"),
    row("IterationLogger(H, close_timeout=-1)", ValueError, "Expected non-negative finite close_timeout, but got -1"),
    row("IterationLogger(H, client='x')", ValueError, "Expected None or an MlflowClient as client, but got 'str'"),
    row("log.log('x', loss=1.0)", ValueError,
        "Expected an integer step for IterationLogger.log(step, ...), but got 'x'"),
    row("log.log(1.5, loss=1.0)", ValueError,
        "Expected an integer step for IterationLogger.log(step, ...), but got 1.5"),
    row("log.log(0, loss='a')", ValueError, VALUE + "str 'a'"),
    row("log.log(0, loss=None)", ValueError, VALUE + "NoneType None"),
    row("log.log(0, loss=True)", ValueError, VALUE + "bool True"),
    row("log.log(0, loss=1 + 2j)", ValueError, VALUE + "complex (1+2j)"),
    row("log.log(0, loss=torch.ones(2))", ValueError, VALUE + "a tensor of shape (2,)"),
    # tune_bounds
    row("tb(make_model=3)", ValueError, "Expected a callable() returning a fresh torch.nn.Module as make_model, but "
        "got 3"),
    row("tb(make_model=lambda: 3)", ValueError, "Expected a callable returning a torch.nn.Module as make_model, but "
        "got 'int'"),
    row("tb(make_optimizer=None)", ValueError, "Expected a callable(model) returning a torch.optim.Optimizer as "
        "make_optimizer, but got None"),
    row("tb(make_optimizer=lambda m: 'sgd')", ValueError,
        "Expected a callable(model) returning a torch.optim.Optimizer "
        "as make_optimizer, but got 'str'"),
    row("tb(loader=5)", ValueError, "Expected an iterable of batches as loader, but got 'int'"),
    row("tb(val_loader=None)", ValueError,
        "Expected an iterable of held-out batches as val_loader, but got 'NoneType'"),
    row("tb(rules=())", ValueError, TB_RULES + "()"),
    row("tb(rules=('median',))", ValueError, TB_RULES + "('median',)"),
    row("tb(rules='median')", ValueError, TB_RULES + "('median',)"),
    row("tb(rules=('valley', 'valley'))", ValueError, TB_RULES + "('valley', 'valley')"),
    row("tb(rules=('accuracy',))", ValueError, "Expected a positive (rules has accuracy, which needs it) eval_every, "
        "but got 0"),
    row("tb(policy='cosine')", ValueError, f"Expected {POLICY} for policy, but got 'cosine'"),
    row("tb(steps=1)", ValueError, "Expected integer in [2, 1e9] (optimizer steps per candidate) for steps, but got 1"),
    row("tb(steps=2.5)", ValueError, "Expected integer in [2, 1e9] (optimizer steps per candidate) for steps, but got "
        "2.5"),
    row("tb(metric_fn=3)", ValueError,
        "Expected None or a callable(model, val_loader) -> float as metric_fn, but got 3"),
    row("tb(seeds=0)", ValueError, "Expected integer in [1, 1000] for seeds, but got 0"),
    row("tb(seed=-1)", ValueError, "Expected integer in [0, 2**32) for seed, but got -1"),
    row("tb(seed=2**32)", ValueError, "Expected integer in [0, 2**32) for seed, but got 4294967296"),
    row("tb(scheduler='hyperband')", ValueError, "Expected one of fifo, asha for scheduler, but got 'hyperband'"),
    row("tb(use_ray='yes')", ValueError, "Expected None, True or False as use_ray, but got 'yes'"),
    row("tb(use_ray=False, scheduler='asha')", ValueError,
        "Expected fifo with use_ray=False (ASHA runs on Ray) as scheduler, but got 'asha'"),
    row("tb(cpus_per_trial=0)", ValueError, "Expected positive cpus_per_trial, but got 0"),
    row("tb(cpus_per_trial=float('nan'))", ValueError, "Expected positive cpus_per_trial, but got nan"),
    row("tb(max_concurrent=0)", ValueError, "Expected None or a positive integer as max_concurrent, but got 0"),
    row("tb(track='no')", ValueError, "Expected True or False as track, but got 'no'"),
    row("tb(progress='x')", ValueError, "Expected True or False as progress, but got 'x'"),
    row("tb(device='tpu')", ValueError, DEVICE + "'tpu'"),
    row("tb(num_iters=5)", ValueError, NUM_ITERS + "5"),
    row("tb(start_lr=0)", ValueError, "Expected positive finite start_lr, but got 0"),
    row("tb(end_lr=1e-8)", ValueError, "Expected finite value > start_lr=1e-07 for end_lr, but got 1e-08"),
    row("tb(bounds_divisor=1)", ValueError, "Expected finite value > 1 for bounds_divisor, but got 1"),
    row("tb(loss_fn=3)", ValueError, "Expected None or a callable(model, batch) -> loss as loss_fn, but got 3"),
    row("tb(amp='x')", ValueError, "Expected None or a torch.dtype (e.g. torch.bfloat16) as amp, but got 'x'"),
    # RangeTestResult
    row("result.suggest('median')", ValueError, f"Expected rule to be one of {RULES}, but got 'median'"),
    row("result.suggest(3)", ValueError, f"Expected rule to be one of {RULES}, but got 3"),
    row("result.suggest('accuracy')", ValueError,
        "rule accuracy gave no bounds on this curve: accuracy was not measured (eval_every=0)"),
    row("dataclasses.replace(result, bounds=None).suggest()", ValueError,
        "Expected a result with bounds (see with_bounds), but this one has none"),
    row("result.with_bounds('median')", ValueError, f"Expected one of {RULES} for rule, but got 'median'"),
    row("result.with_bounds('valley', divisor=0)", ValueError, "Expected finite value > 1 for divisor, but got 0"),
    row("result.plot(ax='x')", ValueError, "Expected None or a matplotlib Axes as ax, but got 'str'"),
]


def rows(store, table: str) -> int:
    """Rows of a table of the test's SQLite store, read directly (as test_bad_inputs.py)."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def make_model():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


@pytest.fixture(scope="module")
def result():
    model = make_model()
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    return lr_find(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, end_lr=100, num_iters=10, track=False,
                   progress=False)


@pytest.mark.parametrize("call,error,line", CASES)
def test_bad_api_input_is_one_line_naming_the_argument_before_anything_is_touched(tracking, tmp_path, result, call,
                                                                                  error, line):
    model = make_model()
    weights = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]

    def tb(**kw):
        args = dict(make_model=make_model, make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                    loader=loader, val_loader=loader, progress=False, track=False) | kw
        return tune_bounds(**args)

    run = MlflowClient().create_run("0").info.run_id if call.startswith("log.") else None
    names = dict(torch=torch, dataclasses=dataclasses, lr_find=lr_find, clr_scheduler=clr_scheduler,
                 IterationLogger=IterationLogger, model=model, opt=opt, loader=loader, H=H, result=result, tb=tb)
    before = set(os.listdir(tmp_path))
    with IterationLogger(run) if run else contextlib.nullcontext() as log:  # noqa: F841 - rows use it
        names["log"] = log
        with pytest.raises(error) as raised:
            eval(call, names)
    assert str(raised.value).splitlines() == [line]
    assert set(os.listdir(tmp_path)) == before
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert (rows(tmp_path / "mlflow.db", "runs"), rows(tmp_path / "mlflow.db", "metrics")) == (1 if run else 0, 0)


def test_the_docs_count_this_table():
    from tests.test_bad_inputs import CASES as COMMANDS, documented_counts

    kinds = {"lr_find": "lr_find", "clr_sch": "clr_scheduler", "Iterati": "IterationLogger", "log.": "IterationLogger",
             "tb(": "tune_bounds", "result.": "RangeTestResult", "datacla": "RangeTestResult"}
    where = Counter(next(v for k, v in kinds.items() if p.values[0].startswith(k)) for p in CASES)
    assert {k: v for k, v in documented_counts().items() if k in where} == where
    text = (Path(__file__).parents[1] / "docs" / "guides" / "faults.md").read_text()
    assert f"{len(CASES)} for the API" in text and f"One table of {len(COMMANDS) + len(CASES)} bad inputs" in text
