"""`clr-mlflow`: thin commands over runner.execute, options generated from config.Config."""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import signal
import sys
import time
import typing
from dataclasses import fields

import click

from clr_mlflow.app.config import COMMANDS, Config, ConfigError
from clr_mlflow.core.schedules import POLICIES

CLICK_TYPES = {int: click.INT, float: click.FLOAT, bool: click.BOOL, str: click.STRING}


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite(ctx, param, value):
    """click's FloatRange lets NaN through (every comparison with NaN is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"Expected a finite number, but got {value!r}")
    return value


def _with_config_options(phases: tuple[str, ...]):
    hints = typing.get_type_hints(Config)

    def decorate(fn):
        for f in reversed([f for f in fields(Config) if f.name in Config.names(phases)]):
            kind = CLICK_TYPES[hints[f.name]]
            fn = click.option(option_name(f.name), f.name, type=kind, default=f.default, show_default=True,
                              help=f.metadata["help"])(fn)
        return fn

    return decorate


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM is handled like Ctrl-C: a KeyboardInterrupt, so buffers flush and the run
    ends KILLED. A second signal exits at once (one within a second of the first is the same
    stop, delivered twice). Yields the signals received."""
    from clr_mlflow.core.interrupts import is_echo

    received: list[int] = []
    first_at = [0.0]

    def handler(signum, frame):
        if received:
            if is_echo(first_at[0]):  # the same stop delivered twice (see interrupts.py)
                return
            os._exit(128 + signum)
        received.append(signum)
        first_at[0] = time.monotonic()
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        if received:
            # Stopping on a signal: ours stays, so an echo of it cannot kill the exit; and when
            # Python's own finalisation begins (it resets handlers to the default, which
            # would let a late echo end the process with -15), the signals are ignored.
            atexit.register(lambda: [signal.signal(s, signal.SIG_IGN) for s in previous])
        else:
            for s, h in previous.items():
                signal.signal(s, h)


@contextlib.contextmanager
def guarded():
    """What every command that runs a range test or a training shares: SIGTERM handled like
    Ctrl-C (the run ends KILLED, exit 130 / 143), a rejected input exit 2 (deleting the run
    `mlflow run` made for it), a training without bounds or diverging exit 1 — each a one-line
    message, never a traceback."""
    from clr_mlflow.core import distributed
    from clr_mlflow.tracking import runs as tracking
    from clr_mlflow.data.datasets import DataError
    from clr_mlflow.app.runner import NoBounds
    from clr_mlflow.core.training import TrainingDiverged

    with stop_on_signals() as received, contextlib.ExitStack() as stack:
        stack.callback(distributed.finish)  # torchrun: leave the process group (no-op otherwise)
        try:
            yield
        except (ConfigError, DataError) as e:
            if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` made a run: a rejected input is no result
                tracking.delete_run(os.environ["MLFLOW_RUN_ID"])
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        except (NoBounds, TrainingDiverged) as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            from clr_mlflow.app.runner import CHECKPOINTED

            signum = received[0] if received else signal.SIGINT
            run = tracking.last_run_id()
            kept = "in MLflow" if run is None or tracking.undelivered(run) is None else "kept (see the spool line above)"
            click.echo(f"Interrupted by {signal.Signals(signum).name}: run {run or '-'} is marked KILLED; every "
                       f"value measured until now is {kept}", err=True)
            if run in CHECKPOINTED:
                click.echo(f"continue it with: clr-mlflow resume {run}", err=True)
            sys.exit(128 + signum)


def _execute(command: str, kwargs: dict) -> None:
    from clr_mlflow.app.runner import execute

    with guarded():
        outcome = execute(Config(**kwargs), command)
    if outcome.run_id is None:
        return  # a torchrun rank other than 0: rank 0 reports
    if outcome.bounds_table is not None:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_colwidth", 70, "display.float_format", "{:.4g}".format):
            click.echo(outcome.bounds_table.to_string(index=False))
    _echo_where(outcome.run_id)
    click.echo(outcome.summary())  # last line: "run <id> | ..."


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def where_lines(run_id: str) -> list[str]:
    """Where to look at `run_id`: its experiment, and the `mlflow ui` command for the store
    in use with the run's page (or the run's page on a tracking server)."""
    from clr_mlflow.tracking.history import location

    loc = location(run_id)
    lines = [f"experiment {loc.experiment!r} (id {loc.experiment_id}), store {loc.tracking_uri}"]
    if loc.ui_command:
        lines.append(f"view: {loc.ui_command}  then open http://127.0.0.1:5000/{loc.ui_path}")
    else:
        lines.append(f"view: {loc.ui_path}")
    return lines


def _echo_where(run_id: str | None) -> None:
    """Where to look at the run; nothing when the store did not take all of it (it may be
    away: the line about the spool, printed when the run ended, says what to do)."""
    from clr_mlflow.tracking import runs as tracking

    if run_id and tracking.undelivered(run_id) is None:
        for line in where_lines(run_id):
            click.echo(line)


@click.group()
@click.version_option(package_name="clr_mlflow")
def main() -> None:
    """LR range test and cyclical learning rates, tracked in MLflow."""


@main.command("range-test")
@_with_config_options(COMMANDS["range-test"])
def range_test_cmd(**kwargs) -> None:
    """LR range test: the loss curve, suggested (base_lr, max_lr) bounds, plot and table."""
    _execute("range-test", kwargs)


@main.command("train")
@_with_config_options(COMMANDS["train"])
def train_cmd(**kwargs) -> None:
    """Train with a cyclical policy between given bounds (base_lr/max_lr or bounds_from)."""
    _execute("train", kwargs)


@main.command("run")
@_with_config_options(COMMANDS["run"])
def run_cmd(**kwargs) -> None:
    """Range test, then training with its chosen bounds, in one MLflow run (skips the
    range test when base_lr/max_lr or bounds_from are given)."""
    _execute("run", kwargs)


@main.command("compare")
@click.option("--experiment", default="clr_mlflow", show_default=True, help="MLflow experiment whose runs to compare")
@click.option("--target-accuracy", type=click.FloatRange(0, 1), default=0.0, show_default=True, callback=_finite,
              help="validation accuracy for the iterations-to-target column (0 = the fixed run's final one)")
@click.option("--log-run", type=click.BOOL, default=True, show_default=True,
              help="log the leaderboard and plots into a comparison run of the experiment")
def compare_cmd(experiment: str, target_accuracy: float, log_run: bool) -> None:
    """Leaderboard of an experiment's runs: policy, bounds, accuracy, iterations to a target."""
    import pandas as pd

    from clr_mlflow.tracking.history import NoRuns
    from clr_mlflow.app.review import compare_experiment

    try:
        result = compare_experiment(experiment, target_accuracy, log_run)
    except NoRuns as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    from clr_mlflow.core.compare import display_board

    with pd.option_context("display.width", 250, "display.max_columns", 20):
        click.echo(display_board(result.board, result.target).to_string(index=False))
    click.echo(result.verdict)
    if result.note:
        click.echo(f"note: {result.note}")
    click.echo(f"read {plural(len(result.board), 'run')} in {result.read_seconds:.2f}s"
               + (f"; logged as run {result.run_id}" if result.run_id else ""))
    _echo_where(result.run_id)


@main.command("reproduce")
@click.argument("run_id")
def reproduce_cmd(run_id: str) -> None:
    """Run RUN_ID again with exactly its params; compare key metrics and the full range-test
    and training curves."""
    import pandas as pd

    from clr_mlflow.app.review import reproduce

    with guarded():
        rep = reproduce(run_id)
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)
    with pd.option_context("display.width", 200, "display.float_format", "{:.6g}".format):
        click.echo(rep.metrics.to_string(index=False))
    for identical, note in rep.curves.values():
        click.echo(note)
    if not rep.curves:
        click.echo(rep.curve_note)
    _echo_where(rep.outcome.run_id)
    click.echo(f"reproduction: run {rep.outcome.run_id} (tag clr_mlflow.reproduces={run_id})")


@main.command("resume")
@click.argument("run_id")
def resume_cmd(run_id: str) -> None:
    """Continue an interrupted training in the same run, from its checkpoint
    (train/checkpoint.pt): the series go on at the next step, and it ends FINISHED."""
    from clr_mlflow.app.resume import resume

    with guarded():
        outcome = resume(run_id)
    _echo_where(outcome.run_id)
    click.echo(outcome.summary())


@main.command("sync")
@click.argument("path", type=click.Path(exists=True))
def sync_cmd(path: str) -> None:
    """Send what a run could not deliver to its tracking store (a spool folder, or the spool
    root for every run in it): metrics, artifacts, the model and the run's end status."""
    from clr_mlflow.tracking import spool

    try:
        click.echo(spool.sync(path))
    except spool.SyncError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


@main.command("sweep")
@click.option("--policies", default=",".join(POLICIES), show_default=True,
              help="policies to train, comma-separated")
@click.option("--bounds-rules", default="loss_edge", show_default=True, help="bounds rules to train with, "
              "comma-separated: the range test chooses the first, the others come from its bounds table")
@click.option("--seeds", "seed_list", default="0", show_default=True,
              help="seeds, comma-separated (a multi-seed range test: --grid seeds=K)")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2",
              help="values of any other parameter, repeatable (or joined by ';'): every combination runs")
@click.option("--ray-address", default="", help="Ray cluster to run on (default: a local Ray started here)")
@click.option("--cpus-per-trial", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              callback=_finite)
@click.option("--gpus-per-trial", type=click.FloatRange(0), default=0.0, show_default=True, callback=_finite)
@click.option("--max-concurrent", type=click.IntRange(0), default=0, show_default=True,
              help="trials at once (0: as many as the resources allow)")
@click.option("--early-stop/--no-early-stop", default=False, show_default=True,
              help="stop trainings that trail at an epoch (Tune's ASHA on val/accuracy)")
@_with_config_options(COMMANDS["run"])
def sweep_cmd(policies, bounds_rules, seed_list, grid, ray_address, cpus_per_trial, gpus_per_trial, max_concurrent,
              early_stop, **kwargs) -> None:
    """Range tests and trainings over policies x bounds rules x seeds x --grid values, as Ray
    Tune trials, each an MLflow run under one parent run that gets the leaderboard."""
    import pandas as pd

    from clr_mlflow.core.compare import display_board
    from clr_mlflow.app.sweep import SweepError, _csv, _ray, parse_grid, sweep

    with guarded():
        try:
            _ray()
            result = sweep(Config(**kwargs), parse_grid(grid), _csv(policies), _csv(bounds_rules),
                           _csv(seed_list, int, "--seeds"), ray_address=ray_address or None,
                           cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                           max_concurrent=max_concurrent or None, early_stop=early_stop)
        except SweepError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        click.echo(display_board(result.board, result.target).to_string(index=False))
    for t in result.trials[result.trials["outcome"] == "failed"].itertuples():
        click.echo(f"failed: {' '.join(filter(None, (t.setting, t.rule, t.policy)))} (run {t.run_id}): {t.error}")
    click.echo(result.verdict)
    for line in where_lines(result.run_id):
        click.echo(line)
    click.echo(result.summary())

# The sweep's lists replace these single-value options (a multi-seed range test: --grid seeds=K).
sweep_cmd.params = [p for p in sweep_cmd.params if p.name not in ("policy", "bounds_rule", "seed", "seeds")]


def run_cli(prog_name: str = "clr-mlflow") -> None:
    """The console script: `main`, with a usage error (a bad option value, an unknown option)
    also deleting the run `mlflow run` made for it: a rejected input is not a result."""
    from clr_mlflow.tracking import runs as tracking

    tracking.bounded_http_retries()  # one call to a store that went away fails in seconds, not minutes
    try:
        code = main.main(prog_name=prog_name, standalone_mode=False)
    except click.ClickException as e:
        if os.environ.get("MLFLOW_RUN_ID"):
            from clr_mlflow.tracking import runs as tracking

            tracking.delete_run(os.environ["MLFLOW_RUN_ID"])
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run_cli()
