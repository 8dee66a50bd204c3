"""Bad input, command by command: one table, each row the exact line expected. Every row
ends non-zero with exactly one line on stderr naming the argument and what was expected, no
traceback, and nothing written: no run in the store, no data cache, no mlflow.db or mlruns
(the store's lock file aside). In-process through click's CliRunner (the same group the
console script, `python -m` and `mlflow run` call); test_faults.py and test_faults2.py check
the same through real processes. The Python API's rows: test_bad_inputs_api.py.

In a row, {tmp} is the test's folder and {run} a bare MLflow run made there first (no
clr_mlflow run); inputs under {tmp}: empty/ (an empty folder), file (a file), text/
(train/ and test/ holding no images) and images/ (a tiny image folder, made on demand).
A row with uri= runs with that MLFLOW_TRACKING_URI; one with reads=True is refused after the
data was read (its decode cache may be written: see docs/guides/faults.md)."""
import contextlib
import importlib.util
import os
import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from clr_mlflow.app.cli import main
from tests.conftest import make_image_folder

H = "0123456789abcdef" * 2
RUN_ID = "Error: Expected RUN_ID to be a run id of 32 lowercase hex characters, but got "
BOUNDS_FROM = "Error: Expected bounds_from to be a run id of 32 lowercase hex characters, but got "
BOOL = "is not a valid boolean. Recognized values: , 0, 1, f, false, n, no, off, on, t, true, y, yes"
LR = ["--base-lr", "0.01", "--max-lr", "0.1"]  # valid bounds, so a train row fails on its own option
IMAGES = ["--data", "{tmp}/images", "--batch-size", "4", "--num-iters", "10"]  # 16 training images
URI = "Error: Expected sqlite:///PATH, http(s)://HOST:PORT or a database URI (postgresql, mysql, mssql) as " \
      "MLFLOW_TRACKING_URI, but got "
POLICY = "one of triangular, triangular2, exp_range, one_cycle, fixed"
RULE = "one of min_div10, steepest, loss_edge, accuracy, valley, slide"
MODEL = "Error: Expected model to be one of small_cnn, resnet18, smith_cifar, fast, module.path:callable, but got "
DATA_DIR = ("run", "train", "range-test", "sweep")  # the commands that take --data-dir
no_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='needs pip install "clr_mlflow[sweep]"')
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def case(args, line, uri=None, reads=False, marks=()):
    return pytest.param(args, line, uri, reads, marks=marks, id=" ".join(args) + (f" [{uri}]" if uri else ""))


CASES = [
    # clr-mlflow itself
    case(["nosuchcmd"], "Error: No such command 'nosuchcmd'."),
    # range-test: numbers (wrong type, zero, negative, nan, inf, out of range)
    case(["range-test", "--num-iters", "1"],
         "Error: Expected 0 (one epoch) or an integer >= 10 for num_iters, but got 1"),
    case(["range-test", "--num-iters", "-5"],
         "Error: Expected 0 (one epoch) or an integer >= 10 for num_iters, but got -5"),
    case(["range-test", "--num-iters", "100000000"], "Error: Expected num_iters <= 10,000,000, but got 100000000"),
    case(["range-test", "--num-iters", "ten"], "Error: Invalid value for '--num-iters': 'ten' is not a valid integer."),
    case(["range-test", "--num-iters", "1e3"], "Error: Invalid value for '--num-iters': '1e3' is not a valid integer."),
    case(["range-test", "--lr-start", "0"], "Error: Expected positive lr_start, but got 0.0"),
    case(["range-test", "--lr-start", "-1"], "Error: Expected positive lr_start, but got -1.0"),
    case(["range-test", "--lr-start", "nan"], "Error: Expected finite lr_start, but got nan"),
    case(["range-test", "--lr-start", "-inf"], "Error: Expected finite lr_start, but got -inf"),
    case(["range-test", "--lr-start", "1e400"], "Error: Expected finite lr_start, but got inf"),
    case(["range-test", "--lr-start", ""], "Error: Invalid value for '--lr-start': '' is not a valid float."),
    case(["range-test", "--lr-end", "1e-6"], "Error: Expected value > lr_start=1e-05 for lr_end, but got 1e-06"),
    case(["range-test", "--lr-end", "inf"], "Error: Expected finite lr_end, but got inf"),
    case(["range-test", "--lr-end", "1e7"], "Error: Expected lr_end <= 1,000,000, but got 10000000.0"),
    case(["range-test", "--beta", "1"], "Error: Expected value in [0, 1) for beta, but got 1.0"),
    case(["range-test", "--beta", "nan"], "Error: Expected finite beta, but got nan"),
    case(["range-test", "--diverge", "1"], "Error: Expected value > 1 for diverge, but got 1.0"),
    case(["range-test", "--diverge", "inf"], "Error: Expected finite diverge, but got inf"),
    case(["range-test", "--eval-every", "-1"], "Error: Expected non-negative integer eval_every, but got -1"),
    case(["range-test", "--bounds-divisor", "1"], "Error: Expected value > 1 for bounds_divisor, but got 1.0"),
    case(["range-test", "--seeds", "0"], "Error: Expected integer in [1, 1000] for seeds, but got 0"),
    case(["range-test", "--seeds", "1001"], "Error: Expected integer in [1, 1000] for seeds, but got 1001"),
    case(["range-test", "--tune-steps", "1"], "Error: Expected integer >= 2 for tune_steps, but got 1"),
    case(["range-test", "--batch-size", "0"], "Error: Expected positive integer batch_size, but got 0"),
    case(["range-test", "--batch-size", "-3"], "Error: Expected positive integer batch_size, but got -3"),
    case(["range-test", "--limit-train", "-1"], "Error: Expected non-negative integer limit_train, but got -1"),
    case(["range-test", "--limit-test", "-1"], "Error: Expected non-negative integer limit_test, but got -1"),
    case(["range-test", "--val-fraction", "1"], "Error: Expected value in [0, 1) for val_fraction, but got 1.0"),
    case(["range-test", "--val-fraction", "-0.1"], "Error: Expected value in [0, 1) for val_fraction, but got -0.1"),
    case(["range-test", "--image-size", "4"], "Error: Expected integer >= 8 for image_size, but got 4"),
    case(["range-test", "--image-size", "5000"], "Error: Expected image_size <= 4,096, but got 5000"),
    case(["range-test", "--momentum", "1"], "Error: Expected value in [0, 1) for momentum, but got 1.0"),
    case(["range-test", "--weight-decay", "-1"], "Error: Expected non-negative weight_decay, but got -1.0"),
    case(["range-test", "--seed", "-1"], "Error: Expected non-negative integer seed, but got -1"),
    case(["range-test", "--seed", "4294967296"], "Error: Expected seed <= 4,294,967,295, but got 4294967296"),
    case(["range-test", "--log-every", "0"], "Error: Expected positive integer log_every, but got 0"),
    case(["range-test", "--augment", "maybe"], f"Error: Invalid value for '--augment': 'maybe' {BOOL}"),
    case(["range-test", "--compile", "2"], f"Error: Invalid value for '--compile': '2' {BOOL}"),
    # range-test: names and choices
    case(["range-test", "--experiment", ""], "Error: Expected a non-empty name for experiment, but got ''"),
    case(["range-test", "--experiment", "   "], "Error: Expected a non-empty name for experiment, but got '   '"),
    case(["range-test", "--preset", "nosuch"],
         "Error: Expected preset to be one of smith2017_cifar10 or empty, but got "
         "'nosuch'"),
    case(["range-test", "--device", "tpu"], "Error: Expected device to be one of auto, cpu, cuda, but got 'tpu'"),
    case(["range-test", "--device", "cuda"], "Error: Expected an available device for device, but got 'cuda'",
         marks=no_cuda),
    case(["range-test", "--optimizer", "adam"], "Error: Expected optimizer to be one of sgd, adamw, but got 'adam'"),
    case(["range-test", "--sweep", "log"], "Error: Expected sweep to be one of exp, linear, but got 'log'"),
    case(["range-test", "--bounds-rule", "median"],
         f"Error: Expected bounds_rule to be {RULE}, tuned, but got 'median'"),
    case(["range-test", "--bounds-rule", "tuned"], f"Error: Expected bounds_rule to be {RULE} for a range test alone "
         "(tuned trains every rule's bounds: use the run command, or -e main), but got 'tuned'"),
    case(["range-test", "--bounds-rule", "accuracy"],
         "Error: Expected eval_every > 0 with bounds_rule=accuracy, but got "
         "eval_every=0"),
    case(["range-test", "--bogus"], "Error: No such option '--bogus'. Did you mean '--bounds-rule'?"),
    case(["range-test", "--policy", "fixed"], "Error: No such option '--policy'."),
    # range-test: plug-ins (module:callable)
    case(["range-test", "--model", "nosuch"], MODEL + "'nosuch'"),
    case(["range-test", "--model", "os:"], MODEL + "'os:'"),
    case(["range-test", "--model", "nosuchmod_q:f"], "Error: Expected model=nosuchmod_q:f to name an importable "
         "module, but importing nosuchmod_q failed: ModuleNotFoundError: No module named 'nosuchmod_q'"),
    case(["range-test", "--model", "os:nosuch"], "Error: Expected model=os:nosuch to name a callable, but os has no "
         "nosuch"),
    case(["range-test", "--model", "os:sep"], "Error: Expected model=os:sep to name a callable, but it is a str"),
    case(["range-test", "--model", "operator:add"] + IMAGES, "Error: Expected model=operator:add to return a "
         "torch.nn.Module, but it returned int", reads=True),
    case(["range-test", "--model", "os:getcwd"] + IMAGES, "Error: Expected model=os:getcwd(num_classes, image_size) "
         "to build a model, but it raised TypeError: posix.getcwd() takes no arguments (2 given)", reads=True),
    case(["range-test", "--data", "nosuchmod_q:f"], "Error: Expected data=nosuchmod_q:f to name an importable module, "
         "but importing nosuchmod_q failed: ModuleNotFoundError: No module named 'nosuchmod_q'"),
    case(["range-test", "--data", "os:nosuch"], "Error: Expected data=os:nosuch to name a callable, but os has no "
         "nosuch"),
    case(["range-test", "--data", "os:getcwd"], "Error: Expected data=os:getcwd() to return a (train, test) pair of "
         "datasets, but got str"),
    case(["range-test", "--data", "builtins:len"], "Error: Expected data=builtins:len() to return (train, test) "
         "datasets, but it raised TypeError: len() takes exactly one argument (0 given)"),
    # range-test: data folders
    case(["range-test", "--data", "{tmp}/nope"], "Error: Expected data to be 'cifar10' or an existing folder, but "
         "{tmp}/nope does not exist"),
    case(["range-test", "--data", "{tmp}/empty"], "Error: Expected data folder with a train/ subfolder, but "
         "{tmp}/empty/train does not exist"),
    case(["range-test", "--data", "{tmp}/file"], "Error: Expected data to be a folder with train/ and test/, but "
         "{tmp}/file is a file"),
    case(["range-test", "--data", "{tmp}/text"], "Error: Expected images in class folder {tmp}/text/train/a, but it "
         "has none"),
    case(["range-test", "--data", "{tmp}/images", "--batch-size", "100"], "Error: Expected batch_size <= the 16 "
         "training images, but got 100", reads=True),
    case(["range-test", "--data", "{tmp}/images", "--batch-size", "2"], "Error: Expected at least 10 batches per epoch "
         "for a one-epoch range test (num_iters=0), but the training set gives 8 of batch_size=2: set num_iters (e.g. "
         "--num-iters 100; the range test runs across epochs)", reads=True),
    # range-test: the tracking store
    case(["range-test"], URI + "'foo://bar'", uri="foo://bar"),
    case(["range-test"], "Error: Expected sqlite:///PATH (three slashes, then the path: sqlite:////abs/mlflow.db) as "
         "MLFLOW_TRACKING_URI, but got 'sqlite://relative.db'", uri="sqlite://relative.db"),
    case(["range-test"], "Error: Expected a SQLite file whose folder exists or can be made ({tmp}/file is a file) as "
         "MLFLOW_TRACKING_URI, but got 'sqlite:///{tmp}/file/sub/mlflow.db'", uri="sqlite:///{tmp}/file/sub/mlflow.db"),
    case(["range-test"], "Error: Expected a SQLite file, not a folder, as MLFLOW_TRACKING_URI, but got "
         "'sqlite:///{tmp}/empty'", uri="sqlite:///{tmp}/empty"),
    # train
    case(["train"], "Error: Expected base_lr and max_lr (or bounds_from), but got neither"),
    case(["train", "--base-lr", "0.01"], "Error: Expected value > base_lr=0.01 for max_lr, but got 0.0"),
    case(["train", "--base-lr", "0.1", "--max-lr", "0.1"],
         "Error: Expected value > base_lr=0.1 for max_lr, but got 0.1"),
    case(["train", "--base-lr", "0.2", "--max-lr", "0.1"],
         "Error: Expected value > base_lr=0.2 for max_lr, but got 0.1"),
    case(["train", "--max-lr", "0.1"], "Error: Expected positive (max_lr was given) base_lr, but got 0.0"),
    case(["train", "--base-lr", "-0.1", "--max-lr", "0.1"], "Error: Expected positive (or 0 for a range test) base_lr, "
         "but got -0.1"),
    case(["train", "--base-lr", "inf", "--max-lr", "0.1"], "Error: Expected finite base_lr, but got inf"),
    case(["train", "--bounds-from", "last"], BOUNDS_FROM + "'last'"),
    case(["train", "--bounds-from", H], f"Error: Expected bounds_from to name an existing run, but got '{H}'"),
    case(["train", "--bounds-from", H] + LR, "Error: Expected either base_lr/max_lr or bounds_from, but got both"),
    case(["train", "--policy", "cosine"] + LR, f"Error: Expected policy to be {POLICY}, but got 'cosine'"),
    case(["train", "--batch-size", "12.5"], "Error: Invalid value for '--batch-size': '12.5' is not a valid integer."),
    case(["train", "--step-size", "-1"] + LR, "Error: Expected non-negative integer step_size, but got -1"),
    case(["train", "--step-epochs", "0"] + LR, "Error: Expected positive step_epochs, but got 0.0"),
    case(["train", "--step-epochs", "nan"] + LR, "Error: Expected finite step_epochs, but got nan"),
    case(["train", "--cycles", "-1"] + LR, "Error: Expected non-negative integer cycles, but got -1"),
    case(["train", "--cycles", "0"] + LR, "Error: Expected positive cycles, epochs or iterations, but got all three 0"),
    case(["train", "--epochs", "-1"] + LR, "Error: Expected non-negative integer epochs, but got -1"),
    case(["train", "--epochs", "1000001"] + LR, "Error: Expected epochs <= 1,000,000, but got 1000001"),
    case(["train", "--iterations", "-1"] + LR, "Error: Expected non-negative integer iterations, but got -1"),
    case(["train", "--iterations", "1000000000000"] + LR, "Error: Expected iterations <= 1,000,000,000, but got "
         "1000000000000"),
    case(["train", "--iterations", "10", "--step-size", "100"] + LR, "Error: Expected value <= iterations=10 (policy="
         "triangular reaches max_lr after step_size iterations) for step_size, but got 100"),
    case(["train", "--policy", "one_cycle", "--iterations", "1"] + LR, "Error: Expected 0 or an integer >= 2 "
         "(policy=one_cycle) for iterations, but got 1"),
    case(["train", "--gamma", "0"] + LR, "Error: Expected value in (0, 1] for gamma, but got 0.0"),
    case(["train", "--gamma", "1.5"] + LR, "Error: Expected value in (0, 1] for gamma, but got 1.5"),
    case(["train", "--base-momentum", "0.95", "--max-momentum", "0.85"] + LR, "Error: Expected 0 <= base < max < 1 for "
         "base_momentum/max_momentum, but got (0.95, 0.85)"),
    case(["train", "--anneal-frac", "1"] + LR, "Error: Expected value in [0, 1) for anneal_frac, but got 1.0"),
    case(["train", "--anneal-div", "0.5"] + LR, "Error: Expected value >= 1 for anneal_div, but got 0.5"),
    case(["train", "--checkpoint-every", "-2"] + LR,
         "Error: Expected -1 (every epoch), 0 (never) or a positive integer "
         "for checkpoint_every, but got -2"),
    case(["train", "--save-model", "x"] + LR, f"Error: Invalid value for '--save-model': 'x' {BOOL}"),
    case(["train", "--system-metrics", "maybe"] + LR, f"Error: Invalid value for '--system-metrics': 'maybe' {BOOL}"),
    case(["train", "--lr-start", "1"] + LR, "Error: No such option '--lr-start'."),
    case(["train"] + LR, URI + "'foo://bar'", uri="foo://bar"),
    # run (range test, then training: both phases' checks)
    case(["run", "--bounds-from", H[:8]], BOUNDS_FROM + f"'{H[:8]}'"),
    case(["run", "--bounds-from", H], f"Error: Expected bounds_from to name an existing run, but got '{H}'"),
    case(["run", "--bounds-rule", "nope"], f"Error: Expected bounds_rule to be {RULE}, tuned, but got 'nope'"),
    case(["run", "--bounds-rule", "tuned", "--tune-steps", "0"], "Error: Expected integer >= 2 for tune_steps, but "
         "got 0"),
    case(["run", "--policy", "cyclic"] + LR, f"Error: Expected policy to be {POLICY}, but got 'cyclic'"),
    case(["run", "--preset", "smith2017_cifar10", "--base-lr", "0.5"], "Error: Expected value > base_lr=0.5 for "
         "max_lr, but got 0.006"),
    case(["run", "--lr-start", "1", "--lr-end", "1"], "Error: Expected value > lr_start=1.0 for lr_end, but got 1.0"),
    case(["run"],
         "Error: Expected a SQLite file, not a folder, as MLFLOW_TRACKING_URI, but got 'sqlite:///{tmp}/empty'",
         uri="sqlite:///{tmp}/empty"),
    # compare
    case(["compare", "--target-accuracy", "nan"], "Error: Invalid value for '--target-accuracy': Expected a finite "
         "number, but got nan"),
    case(["compare", "--target-accuracy", "2"], "Error: Invalid value for '--target-accuracy': 2.0 is not in the range "
         "0<=x<=1."),
    case(["compare", "--target-accuracy", "-0.5"], "Error: Invalid value for '--target-accuracy': -0.5 is not in the "
         "range 0<=x<=1."),
    case(["compare", "--target-accuracy", "inf"], "Error: Invalid value for '--target-accuracy': inf is not in the "
         "range 0<=x<=1."),
    case(["compare", "--target-accuracy", "x"], "Error: Invalid value for '--target-accuracy': 'x' is not a valid "
         "float range."),
    case(["compare", "--log-run", "maybe"], f"Error: Invalid value for '--log-run': 'maybe' {BOOL}"),
    case(["compare", "--experiment", "nosuch"], "Error: Expected an existing experiment, but there is no experiment "
         "named 'nosuch'"),
    case(["compare", "--experiment", ""],
         "Error: Expected an existing experiment, but there is no experiment named ''"),
    # reproduce
    case(["reproduce"], "Error: Missing argument 'RUN_ID'."),
    case(["reproduce", H.upper()], RUN_ID + f"'{H.upper()}'"),
    case(["reproduce", "../" + H[3:]], RUN_ID + f"'../{H[3:]}'"),
    case(["reproduce", "a", "b"], RUN_ID + "'a'"),
    case(["reproduce", H], f"Error: Expected RUN_ID to name an existing run, but got '{H}'"),
    case(["reproduce", "{run}"], "Error: Expected RUN_ID to name a range-test or training run of clr_mlflow, but {run} "
         "is not"),
    # resume
    case(["resume"], "Error: Missing argument 'RUN_ID'."),
    case(["resume", "*"], RUN_ID + "'*'"),
    case(["resume", H + "0"], RUN_ID + f"'{H}0'"),
    case(["resume", H], f"Error: Expected RUN_ID to name an existing run, but got '{H}'"),
    case(["resume", "{run}"], "Error: Expected RUN_ID to name a training run of clr_mlflow, but {run} is not one"),
    # sync
    case(["sync"], "Error: Missing argument 'PATH'."),
    case(["sync", "/nonexistent/spool"], "Error: Invalid value for 'PATH': Path '/nonexistent/spool' does not exist."),
    case(["sync", "{tmp}/file"], "Error: Expected a clr_mlflow spool folder (with run.json) or a folder of them, but "
         "{tmp}/file is neither"),
    case(["sync", "{tmp}/empty"], "Error: Expected a clr_mlflow spool folder (with run.json) or a folder of them, but "
         "{tmp}/empty is neither"),
    # sweep: its own options, then each trial's config before any trial starts
    case(["sweep", "--max-trials", "0"], "Error: Invalid value for '--max-trials': 0 is not in the range x>=1."),
    case(["sweep", "--max-trials", "x"], "Error: Invalid value for '--max-trials': 'x' is not a valid integer range."),
    case(["sweep", "--cpus-per-trial", "0"],
         "Error: Invalid value for '--cpus-per-trial': 0.0 is not in the range x>0."),
    case(["sweep", "--gpus-per-trial", "-1"], "Error: Invalid value for '--gpus-per-trial': -1.0 is not in the range "
         "x>=0."),
    case(["sweep", "--max-concurrent", "-1"], "Error: Invalid value for '--max-concurrent': -1 is not in the range "
         "x>=0."),
    case(["sweep", "--policy", "fixed"], "Error: No such option '--policy'. (Did you mean one of: '--epochs', "
         "'--policies'?)"),
    case(["sweep", "--early-stop", "yes"], "Error: Got unexpected extra argument (yes)"),
]
NEEDS_RAY = [  # these reach the sweep's own checks, after Ray is imported
    ("--seeds", "a,b"), "Error: Expected --seeds to be integers separated by commas, but got 'a,b'",
    ("--seeds", "1.5"), "Error: Expected --seeds to be integers separated by commas, but got '1.5'",
    ("--seeds", ""), "Error: Expected at least one policy, bounds rule and seed, but got an empty list",
    ("--policies", ""), "Error: Expected at least one policy, bounds rule and seed, but got an empty list",
    ("--seeds", "-1"), "Error: seed=-1 policy=triangular: Expected non-negative integer seed, but got -1",
    ("--policies", "cosine"), f"Error: seed=0 policy=cosine: Expected policy to be {POLICY}, but got 'cosine'",
    ("--bounds-rules", "nope"), f"Error: seed=0 policy=triangular: Expected bounds_rule to be {RULE}, tuned, but got "
                                "'nope'",
    ("--lr-start", "0"), "Error: seed=0 policy=triangular: Expected positive lr_start, but got 0.0",
    ("--grid", "policy=fixed"), "Error: Expected --grid keys to be parameters other than policy, bounds_rule, seed, "
                                "experiment and run_name, with values, but got 'policy' (--policies)",
    ("--grid", "nosuch=1,2"), "Error: Expected --grid keys to be parameters other than policy, bounds_rule, seed, "
                              "experiment and run_name, with values, but got 'nosuch' (see --help)",
    ("--grid", "=1"), "Error: Expected --grid keys to be parameters other than policy, bounds_rule, seed, experiment "
                      "and run_name, with values, but got '' (see --help)",
    ("--grid", "batch_size"), "Error: Expected --grid KEY=V1,V2 with each KEY once, but got 'batch_size'",
    ("--grid", "batch_size="), "Error: Expected --grid KEY=V1,V2 with each KEY once, but got 'batch_size='",
    ("--grid", "batch_size=8;batch_size=16"), "Error: Expected --grid KEY=V1,V2 with each KEY once, but got "
                                              "'batch_size=16'",
    ("--grid", "batch_size=a,b"), "Error: Expected param batch_size to be an integer, but got 'a'",
    ("--grid", "batch_size=0"), "Error: seed=0 batch_size=0 policy=triangular: Expected positive integer batch_size, "
                                "but got 0",
    ("--grid", "lr_start=0"), "Error: seed=0 lr_start=0.0 policy=triangular: Expected positive lr_start, but got 0.0",
    ("--seeds", "0,1", "--grid", "batch_size=8,16", "--max-trials", "3") + tuple(LR),
    "Error: Expected at most --max-trials=3 trials, but this sweep makes at least 20: pass --max-trials 20 (or more) "
    "to run them all",
]
CASES += [case(["sweep", *args], line, marks=no_ray) for args, line in zip(NEEDS_RAY[::2], NEEDS_RAY[1::2])]


def rows(store, table: str) -> int:
    """Rows of a table of the test's SQLite store, read directly (MLflow's client would first
    verify the schema: a tenth of a second a test)."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a folder")
    for split in ("train", "test"):
        (tmp_path / "text" / split / "a").mkdir(parents=True)
        (tmp_path / "text" / split / "a" / "notes.txt").write_text("no image")
    return tmp_path


@pytest.mark.parametrize("args,line,uri,reads", CASES)
def test_bad_input_is_exactly_one_line_naming_the_argument_before_anything_is_written(tracking, inputs, monkeypatch,
                                                                                     args, line, uri, reads):
    tmp = str(inputs)
    if any("{tmp}/images" in a for a in args):
        make_image_folder(inputs / "images", per_class=(6, 2), size=8)
    run = MlflowClient().create_run("0").info.run_id if "{run}" in args else ""
    if uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp))
    before = set(os.listdir(inputs))
    args = [a.format(tmp=tmp, run=run) for a in args]
    data = ["--data-dir", str(inputs / "data")] if args[0] in DATA_DIR else []
    res = CliRunner().invoke(main, args + data)
    assert res.exit_code != 0 and res.stderr.strip().splitlines() == [line.format(tmp=tmp, run=run)], res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    assert rows(inputs / "mlflow.db", "runs") == (1 if run else 0)
    made = set(os.listdir(inputs)) - before  # the store's lock file only (no mlruns, no other mlflow.db)
    assert made <= {"mlflow.db.lock"} | ({"data"} if reads else set()), made


def documented_counts() -> dict[str, int]:
    """The rows per command or API name that docs/guides/faults.md's "Bad input" table gives."""
    text = (Path(__file__).parents[1] / "docs" / "guides" / "faults.md").read_text()
    counts = {}
    for names, numbers in re.findall(r"^\| (`.+?) \| ([\d, ]+) \|", text, re.M):
        counts |= dict(zip(re.findall(r"`([^`]+)`", names), map(int, numbers.split(","))))
    return counts


def test_the_docs_count_this_table():
    where = Counter(p.values[0][0] if p.values[0][0] in main.commands else "clr-mlflow" for p in CASES)
    assert {k: v for k, v in documented_counts().items() if k in where} == where
    assert f"{len(CASES)} rows for the commands" in (Path(__file__).parents[1] / "docs/guides/faults.md").read_text()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon", "1e9"])
def test_a_flush_interval_that_is_not_seconds_is_one_line_before_any_run(tracking, inputs, monkeypatch, value):
    monkeypatch.setenv("CLR_MLFLOW_FLUSH_SECONDS", value)
    res = CliRunner().invoke(main, ["train", *LR, "--data", str(inputs / "empty"), "--data-dir", str(inputs / "data")])
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        f"Error: Expected seconds in (0, 3600] as CLR_MLFLOW_FLUSH_SECONDS, but got {value!r}"], res.output
    assert rows(inputs / "mlflow.db", "runs") == 0
