"""What the CLI and the sweep both take from the command line: run ids, comma lists, counts
in words. The CLI and sweep.py import from here (and cli.py from sweep.py), never the other way."""
from __future__ import annotations

import re

from clr_mlflow.app.config import ConfigError

RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow makes: uuid4().hex
MAX_TRIALS = 1000  # a sweep larger than this is more often a typo than a plan, unless --max-trials says so


def run_id(value: str, name: str = "RUN_ID") -> str:
    """`value` when it is a run id as MLflow makes them (32 lowercase hex characters): never a
    pattern, a path or an abbreviation, since an id ends up in file names and store queries."""
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise ConfigError(f"Expected {name} to be a run id of 32 lowercase hex characters, but got {value!r}")
    return value


def csv_list(text: str, kind=str, what: str = "") -> list:
    """`a,b,c` as a list (blanks dropped), each converted by `kind`."""
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"Expected {what} to be integers separated by commas, but got {text!r}") from None


TRUE, FALSE = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off"}  # click's BOOL words


def boolean(text: str) -> bool:
    """A boolean as the CLI accepts it (click's words, any case), or ValueError."""
    word = text.strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise ValueError(text)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
