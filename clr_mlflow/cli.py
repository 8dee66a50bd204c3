"""`clr-mlflow`: thin commands over runner.execute, options generated from config.Config."""
from __future__ import annotations

import sys
import typing
from dataclasses import fields

import click

from .config import RANGE, TRAIN, Config, ConfigError

CLICK_TYPES = {int: click.INT, float: click.FLOAT, bool: click.BOOL, str: click.STRING}
PHASES = {"range-test": (RANGE,), "train": (TRAIN,), "run": (RANGE, TRAIN)}


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _with_config_options(phases: tuple[str, ...]):
    hints = typing.get_type_hints(Config)

    def decorate(fn):
        for f in reversed([f for f in fields(Config) if f.name in Config.names(phases)]):
            kind = CLICK_TYPES[hints[f.name]]
            fn = click.option(option_name(f.name), f.name, type=kind, default=f.default, show_default=True,
                              help=f.metadata["help"])(fn)
        return fn

    return decorate


def _execute(phases: tuple[str, ...], kwargs: dict) -> None:
    from .data import DataError
    from .runner import NoBounds, execute

    try:
        outcome = execute(Config(**kwargs), phases)
    except (ConfigError, DataError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except NoBounds as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    click.echo(outcome.summary(Config(**kwargs)))


@click.group()
@click.version_option(package_name="clr_mlflow")
def main() -> None:
    """LR range test and cyclical learning rates, tracked in MLflow."""


@main.command("range-test")
@_with_config_options(PHASES["range-test"])
def range_test_cmd(**kwargs) -> None:
    """LR range test: the loss curve, suggested (base_lr, max_lr) bounds, plot and table."""
    _execute(PHASES["range-test"], kwargs)


@main.command("train")
@_with_config_options(PHASES["train"])
def train_cmd(**kwargs) -> None:
    """Train with a cyclical policy between given bounds (base_lr/max_lr or bounds_from)."""
    _execute(PHASES["train"], kwargs)


@main.command("run")
@_with_config_options(PHASES["run"])
def run_cmd(**kwargs) -> None:
    """Range test, then training with its chosen bounds, in one MLflow run (skips the
    range test when base_lr/max_lr or bounds_from are given)."""
    _execute(PHASES["run"], kwargs)


if __name__ == "__main__":
    main()
