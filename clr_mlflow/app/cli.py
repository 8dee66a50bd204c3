"""`clr-mlflow`: thin commands over runner.execute, options generated from config.Config."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import typing
from dataclasses import fields
from typing import NoReturn

import click

from clr_mlflow.app.args import MAX_TRIALS, csv_list, plural, run_id as checked_run_id
from clr_mlflow.app.config import COMMANDS, Config, ConfigError, check_tracking_uri
from clr_mlflow.app.signals import stop_on_signals
from clr_mlflow.core.schedules import POLICIES

CLICK_TYPES = {int: click.INT, float: click.FLOAT, bool: click.BOOL, str: click.STRING}


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite(ctx, param, value):
    """click's FloatRange lets NaN through (every comparison with NaN is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"Expected a finite number, but got {value!r}")
    return value


def _run_id(ctx, param, value):
    """A run id argument or option: 32 lowercase hex characters, never a pattern ('' for an
    option left out)."""
    if value == "" and param.param_type_name == "option":
        return value
    name = param.human_readable_name if param.param_type_name == "argument" else param.name
    try:
        return checked_run_id(value, name)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


RUN_ID_OPTIONS = {"bounds_from"}  # Config fields that hold a run id


def _with_config_options(phases: tuple[str, ...]):
    hints = typing.get_type_hints(Config)

    def decorate(fn):
        for f in reversed([f for f in fields(Config) if f.name in Config.names(phases)]):
            kind = CLICK_TYPES[hints[f.name]]
            fn = click.option(option_name(f.name), f.name, type=kind, default=f.default, show_default=True,
                              help=f.metadata["help"], callback=_run_id if f.name in RUN_ID_OPTIONS else None)(fn)
        return fn

    return decorate


ALLOW_PLUGINS = click.option("--allow-plugins", is_flag=True, default=False,
                             help="import the model/data plug-in (module:callable) the run's params name; "
                                  "refused without it")


class _Rejected(Exception):
    pass


def reject(message: str, code: int = 2) -> NoReturn:
    """A rejected input: one line, exit `code`, before anything is written. Inside `mlflow
    run` the run it made for this command ends FAILED, tagged clr_mlflow.kind=rejected with
    the line as its description (compare skips it): MLflow's project runner then says in one
    line that the run failed, where a run deleted under it made it print a traceback."""
    made = os.environ.get("MLFLOW_RUN_ID")
    if made:
        from clr_mlflow.app.review import REJECTED
        from clr_mlflow.tracking import runs as tracking

        with contextlib.suppress(Exception):  # the store's own trouble is not this line's
            with tracking.active_run("", run_id=made):
                tracking.set_tags({"clr_mlflow.kind": REJECTED, "mlflow.note.content": message})
                raise _Rejected
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def guarded():
    """What every command that runs a range test or a training shares: SIGTERM handled like
    Ctrl-C (the run ends KILLED, exit 130 / 143), a rejected input exit 2 (`reject`: the run
    `mlflow run` made for it ends FAILED, tagged rejected), a training without bounds or
    diverging exit 1 — each a one-line message, never a traceback."""
    from clr_mlflow.core import distributed
    from clr_mlflow.tracking import runs as tracking
    from clr_mlflow.data.datasets import DataError
    from clr_mlflow.app.runner import NoBounds
    from clr_mlflow.core.interrupts import StopRequested
    from clr_mlflow.core.training import TrainingDiverged

    with stop_on_signals() as received, contextlib.ExitStack() as stack:
        stack.callback(distributed.finish)  # torchrun: leave the process group (no-op otherwise)
        try:
            yield
        except (ConfigError, DataError) as e:
            reject(str(e))
        except (NoBounds, TrainingDiverged, StopRequested) as e:  # StopRequested: e.g. no room left for values
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


def check_store_uri() -> None:
    """For the commands that read a store without a Config (compare, reproduce, resume; sync reads the
    spool's own URI):
    a MLFLOW_TRACKING_URI no store opens at is one line, before MLflow's traceback."""
    try:
        check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))
    except ConfigError as e:
        reject(str(e))


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


class _OneLineErrors(click.Group):
    """click's usage errors (a bad option value, an unknown option) as one line, exit 2,
    through `reject`: the same line whether the console script, `python -m`, `mlflow run`
    or click's CliRunner calls the group."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except getattr(click.exceptions, "NoArgsIsHelpError", ()) as e:  # a bare `clr-mlflow`: the help
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            reject(e.format_message(), e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineErrors)
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
    check_store_uri()
    import pandas as pd

    from clr_mlflow.tracking.history import NoRuns
    from clr_mlflow.app.review import compare_experiment

    try:
        result = compare_experiment(experiment, target_accuracy, log_run)
    except ConfigError as e:  # the store is not there
        reject(str(e))
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
@click.argument("run_id", callback=_run_id)
@ALLOW_PLUGINS
def reproduce_cmd(run_id: str, allow_plugins: bool) -> None:
    """Run RUN_ID again with exactly its params; compare key metrics and the full range-test
    and training curves."""
    check_store_uri()
    import pandas as pd

    from clr_mlflow.app.review import reproduce

    with guarded():
        rep = reproduce(run_id, allow_plugins)
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
@click.argument("run_id", callback=_run_id)
@ALLOW_PLUGINS
def resume_cmd(run_id: str, allow_plugins: bool) -> None:
    """Continue an interrupted training in the same run, from its checkpoint
    (train/checkpoint.pt): the series go on at the next step, and it ends FINISHED. One
    process at a time: a second resume of the run is refused while the first holds its lease."""
    check_store_uri()
    from clr_mlflow.app.resume import resume

    with guarded():
        outcome = resume(run_id, allow_plugins)
    _echo_where(outcome.run_id)
    click.echo(outcome.summary())


@main.command("sync")
@click.argument("path", type=click.Path(exists=True))
def sync_cmd(path: str) -> None:
    """Send what a run could not deliver to its tracking store (a spool folder, or the spool
    root for every run in it): metrics, artifacts, the model and the run's end status."""
    from clr_mlflow.tracking import spool
    from clr_mlflow.tracking import sync as spool_sync

    try:
        click.echo(spool_sync.sync(path))
    except spool.SyncError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


@main.command("sweep")
@click.option("--policies", default=",".join(POLICIES), show_default=True,
              help="policies to train, comma-separated")
@click.option("--bounds-rules", default="steepest", show_default=True, help="bounds rules to train with, "
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
@click.option("--max-trials", type=click.IntRange(1), default=MAX_TRIALS, show_default=True,
              help="refuse a sweep of more trials than this (a larger grid is more often a typo than a plan)")
@click.option("--early-stop/--no-early-stop", default=False, show_default=True,
              help="stop trainings that trail at an epoch (Tune's ASHA on val/accuracy)")
@_with_config_options(COMMANDS["run"])
def sweep_cmd(policies, bounds_rules, seed_list, grid, ray_address, cpus_per_trial, gpus_per_trial, max_concurrent,
              max_trials, early_stop, **kwargs) -> None:
    """Range tests and trainings over policies x bounds rules x seeds x --grid values, as Ray
    Tune trials, each an MLflow run under one parent run that gets the leaderboard."""
    import pandas as pd

    from clr_mlflow.core.compare import display_board
    from clr_mlflow.app.ray_cluster import SweepError, ray_modules
    from clr_mlflow.app.sweep import parse_grid, sweep

    with guarded():
        try:
            ray_modules()
            result = sweep(Config(**kwargs), parse_grid(grid), csv_list(policies), csv_list(bounds_rules),
                           csv_list(seed_list, int, "--seeds"), ray_address=ray_address or None,
                           cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                           max_concurrent=max_concurrent or None, early_stop=early_stop, max_trials=max_trials)
        except SweepError as e:
            reject(str(e), 1)
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
    """The console script: `main` (usage errors one line, see _OneLineErrors), with MLflow's
    HTTP retries bounded."""
    from clr_mlflow.tracking import runs as tracking

    tracking.bounded_http_retries()  # one call to a store that went away fails in seconds, not minutes
    show_library_messages()
    main.main(prog_name=prog_name)


def show_library_messages() -> None:
    """The library reports through `logging` (a guest prints nothing); the CLI is the program
    here, so it shows the package's notes and warnings on stderr, as written."""
    import logging

    package = logging.getLogger("clr_mlflow")
    if not any(getattr(h, "clr_mlflow_cli", False) for h in package.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.clr_mlflow_cli = True
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False  # shown once, whatever the root logger does


if __name__ == "__main__":
    run_cli()
