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
    """A finite number: a float, int, NumPy scalar or one-element tensor (torch takes tensor
    lrs); not a string, bool or None (comparing those would raise TypeError, or pass True as 1)."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
