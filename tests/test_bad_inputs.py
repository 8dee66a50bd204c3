"""Bad input, command by command: each is exactly one line on stderr naming the argument and
what was expected, exit 2, and nothing in the store. In-process through click's CliRunner
(the same group the console script, `python -m` and `mlflow run` call); test_faults.py and
test_faults2.py check the same through real processes."""
import importlib.util

import mlflow
import pytest
from click.testing import CliRunner

from clr_mlflow.app.cli import main

H = "0123456789abcdef" * 2
RUN_ID = "Error: Expected RUN_ID to be a run id of 32 lowercase hex characters, but got "
BOUNDS_FROM = "Error: Expected bounds_from to be a run id of 32 lowercase hex characters, but got "
no_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='needs pip install "clr_mlflow[sweep]"')

CASES = [
    (["resume", "*"], RUN_ID + "'*'"),
    (["resume", H + "0"], RUN_ID + f"'{H}0'"),
    (["reproduce", H.upper()], RUN_ID + f"'{H.upper()}'"),
    (["reproduce", "../" + H[3:]], RUN_ID + f"'../{H[3:]}'"),
    (["resume"], "Error: Missing argument 'RUN_ID'."),
    (["train", "--bounds-from", "last"], BOUNDS_FROM + "'last'"),
    (["run", "--bounds-from", H[:8]], BOUNDS_FROM + f"'{H[:8]}'"),
    (["range-test", "--num-iters", "1"], "Error: Expected 0 (one epoch) or an integer >= 10 for num_iters, but got 1"),
    (["range-test", "--lr-start", "0"], "Error: Expected positive lr_start, but got 0.0"),
    (["range-test", "--lr-end", "1e-6"], "Error: Expected value > lr_start=1e-05 for lr_end, but got 1e-06"),
    (["range-test", "--bogus"], "Error: No such option '--bogus'. Did you mean '--bounds-rule'?"),
    (["train", "--batch-size", "12.5"], "Error: Invalid value for '--batch-size': '12.5' is not a valid integer."),
    (["train", "--base-lr", "0.01"], "Error: Expected value > base_lr=0.01 for max_lr, but got 0.0"),
    (["train", "--policy", "cosine", "--base-lr", "0.01", "--max-lr", "0.1"],
     "Error: Expected policy to be one of triangular, triangular2, exp_range, one_cycle, fixed, but got 'cosine'"),
    (["compare", "--target-accuracy", "nan"],
     "Error: Invalid value for '--target-accuracy': Expected a finite number, but got nan"),
    (["compare", "--target-accuracy", "2"],
     "Error: Invalid value for '--target-accuracy': 2.0 is not in the range 0<=x<=1."),
    (["sync", "/nonexistent/spool"], "Error: Invalid value for 'PATH': Path '/nonexistent/spool' does not exist."),
    (["sweep", "--max-trials", "0"], "Error: Invalid value for '--max-trials': 0 is not in the range x>=1."),
    (["sweep", "--cpus-per-trial", "0"], "Error: Invalid value for '--cpus-per-trial': 0.0 is not in the range x>0."),
    pytest.param(["sweep", "--seeds", "a,b"],
                 "Error: Expected --seeds to be integers separated by commas, but got 'a,b'", marks=no_ray),
    pytest.param(["sweep", "--grid", "policy=fixed"],
                 "Error: Expected --grid keys to be parameters other than policy, bounds_rule, seed, experiment and "
                 "run_name, with values, but got 'policy' (--policies)", marks=no_ray),
    pytest.param(["sweep", "--grid", "batch_size"], "Error: Expected --grid KEY=V1,V2 with each KEY once, but got "
                 "'batch_size'", marks=no_ray),
    pytest.param(["sweep", "--seeds", "0,1", "--grid", "batch_size=8,16", "--max-trials", "3", "--base-lr", "0.01",
                  "--max-lr", "0.1"],
                 "Error: Expected at most --max-trials=3 trials, but this sweep makes at least 20: pass --max-trials 20 "
                 "(or more) to run them all", marks=no_ray),
]


@pytest.mark.parametrize("args,line", CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_input_is_exactly_one_line_naming_the_argument_before_anything_is_written(tracking, tmp_path, args,
                                                                                     line):
    data = ["--data-dir", str(tmp_path / "data")] if args[0] in ("run", "train", "range-test") else []
    res = CliRunner().invoke(main, args + data)
    assert (res.exit_code, res.stderr.strip().splitlines()) == (2, [line]), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert mlflow.search_runs(search_all_experiments=True).empty
    assert not (tmp_path / "data").exists()
