"""Argument checks shared by the public API (lr_find, clr_scheduler) and the CLI's config:
one wording for every rejected value, `Expected <what> <name>, but got <value>`, raised
before anything is touched. Pure Python: no torch, no mlflow."""
from __future__ import annotations

import math
import numbers


def need(ok: bool, name: str, expected: str, value, error: type[ValueError] = ValueError) -> None:
    """Raise `error` naming the argument and what it must be, unless `ok`."""
    if not ok:
        raise error(f"Expected {expected} {name}, but got {value!r}")


def is_int(value, low: int) -> bool:
    """An integer >= `low`; a bool is not one (True would pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def is_finite(value) -> bool:
    """A real, finite number (a string or None is not; comparing them would raise TypeError)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
