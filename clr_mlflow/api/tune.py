"""`tune_bounds`: when the rules disagree about the bounds, let training decide. One range
test, then every rule's (base_lr, max_lr) trained for a short budget from the same start
(weights, data order) and scored on held-out data; the best score wins.

The candidates run one after another in this process, or as Ray Tune trials (ASHA stops
those that trail at an epoch's end). Tracked as a parent run (tag clr_mlflow.kind=tune:
the range test, the bounds table with the winner selected, `tune/candidates.json`) with a
child run per candidate (clr_mlflow.kind=train, mlflow.parentRunId), as `clr-mlflow sweep`
lays out its trials. The CLI's `bounds_rule=tuned` is `tune_candidates` on its own loaders."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from clr_mlflow.api.finder import MAX_SEEDS, lr_find
from clr_mlflow.core.bounds import RULES, mark_disagreement
from clr_mlflow.core.checks import is_finite, is_int, need
from clr_mlflow.core.engine import seed_everything
from clr_mlflow.core.range_test import RangeTestResult
from clr_mlflow.core.schedules import POLICIES
from clr_mlflow.core.steps import CrossEntropy, LossFn, model_device
from clr_mlflow.api.tune_train import Outcome, Setup, _build, _callers_state, _generators, _outcome, train_candidate

LOSS_RULES = tuple(r for r in RULES if r != "accuracy")  # the default candidates (accuracy needs eval_every)
SCHEDULERS = ("fifo", "asha")
INSTALL = 'pip install "clr_mlflow[sweep]"'
PROBE_RULE = "valley"  # selected in the range test until training has chosen (it never warns of itself)
COLUMNS = ["rule", "base_lr", "max_lr", "metric", "metric_min", "metric_max", "outcome", "selected", "run_id", "note"]


@dataclass(frozen=True)
class TunedBounds:
    """The winner of `tune_bounds`: which rule's bounds trained best, and every candidate.

    Attributes:
        rule: the winning rule ('' when no candidate could be trained).
        base_lr: the winner's base_lr.
        max_lr: the winner's max_lr.
        metric: the winner's validation metric (mean over the seeds).
        table: one row per rule: base_lr, max_lr, metric (mean over the seeds; NaN when not
            trained to the end), metric_min, metric_max, outcome (finished, diverged,
            early_stopped, no bounds), selected, run_id (its child run) and note.
        range_test: the range test, the winner selected in its bounds table.
        policy: the CLR policy the candidates trained with.
        steps: the optimizer steps each candidate trained for.
        run_id: the parent run, when tracked.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import clr_mlflow
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(512, 8, generator=g)
        >>> y = (x[:, 0] + x[:, 1] > 0).long()
        >>> train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 384, 32)]
        >>> val = [(x[384:], y[384:])]
        >>> tuned = clr_mlflow.tune_bounds(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
        ...                                lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        ...                                train, val, rules=("valley", "min_div10"), steps=24, end_lr=100,
        ...                                track=False, progress=False)
        >>> sorted(tuned.table["rule"])
        ['min_div10', 'valley']
        >>> bool(tuned.table["selected"].sum() == (1 if tuned.rule else 0))
        True
    """

    rule: str
    base_lr: float
    max_lr: float
    metric: float
    table: pd.DataFrame
    range_test: RangeTestResult
    policy: str
    steps: int
    run_id: str | None = None

    def suggest(self) -> tuple[float, float]:
        """The winner's bounds.

        Returns:
            (base_lr, max_lr) of the winning rule.

        Raises:
            ValueError: no candidate could be trained (every rule's outcome and note said).

        Examples:
            >>> import torch
        >>> from torch import nn
        >>> import clr_mlflow
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(512, 8, generator=g)
        >>> y = (x[:, 0] + x[:, 1] > 0).long()
        >>> train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 384, 32)]
        >>> val = [(x[384:], y[384:])]
        >>> tuned = clr_mlflow.tune_bounds(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
        ...                                lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        ...                                train, val, rules=("valley", "min_div10"), steps=24, end_lr=100,
        ...                                track=False, progress=False)

            >>> tuned.suggest() == (tuned.base_lr, tuned.max_lr)
            True
        """
        if not self.rule:
            raise ValueError("no rule's bounds could be trained: " + "; ".join(
                f"{r.rule}: {r.outcome}" + (f" ({r.note})" if r.note else "") for r in self.table.itertuples()))
        return self.base_lr, self.max_lr


def check(make_model, make_optimizer, loader, val_loader, rules, policy, steps, metric_fn, seeds, seed, scheduler,
          use_ray, cpus_per_trial, max_concurrent, eval_every: int = 0) -> bool:
    """Every argument, one line naming the first bad one; True when the candidates run on Ray."""
    need(callable(make_model), "make_model", "a callable() returning a fresh torch.nn.Module as", make_model)
    need(callable(make_optimizer), "make_optimizer", "a callable(model) returning a torch.optim.Optimizer as",
         make_optimizer)
    need(hasattr(loader, "__iter__"), "loader", "an iterable of batches as", type(loader).__name__)
    need(hasattr(val_loader, "__iter__"), "val_loader", "an iterable of held-out batches as",
         type(val_loader).__name__)
    rules = (rules,) if isinstance(rules, str) else rules
    need(isinstance(rules, Sequence) and len(rules) > 0 and all(r in RULES for r in rules)
         and len(set(rules)) == len(rules), "rules", f"a non-empty list of distinct rules from {', '.join(RULES)} as",
         rules)
    need("accuracy" not in rules or eval_every > 0, "eval_every", "a positive (rules has accuracy, which needs it)",
         eval_every)
    need(policy in POLICIES, "policy", f"one of {', '.join(POLICIES)} for", policy)
    need(is_int(steps, 2) and steps <= 10**9, "steps", "integer in [2, 1e9] (optimizer steps per candidate) for",
         steps)
    need(metric_fn is None or callable(metric_fn), "metric_fn", "None or a callable(model, val_loader) -> float as",
         metric_fn)
    need(is_int(seeds, 1) and seeds <= MAX_SEEDS, "seeds", f"integer in [1, {MAX_SEEDS}] for", seeds)
    need(is_int(seed, 0) and seed < 2**32, "seed", "integer in [0, 2**32) for", seed)
    need(scheduler in SCHEDULERS, "scheduler", f"one of {', '.join(SCHEDULERS)} for", scheduler)
    need(use_ray is None or isinstance(use_ray, bool), "use_ray", "None, True or False as", use_ray)
    need(not (use_ray is False and scheduler == "asha"), "scheduler", "fifo with use_ray=False (ASHA runs on Ray) as",
         scheduler)
    need(is_finite(cpus_per_trial) and cpus_per_trial > 0, "cpus_per_trial", "positive", cpus_per_trial)
    need(max_concurrent is None or is_int(max_concurrent, 1), "max_concurrent", "None or a positive integer as",
         max_concurrent)
    has_ray = importlib.util.find_spec("ray") is not None
    need(has_ray or not use_ray, "use_ray", f"Ray Tune installed ({INSTALL}) for", use_ray)
    if scheduler == "asha" and not has_ray:
        logging.getLogger(__name__).warning(f"tune_bounds: ASHA needs Ray Tune ({INSTALL}); every candidate runs "
                                            "to the end in this process")
    return bool(use_ray or (use_ray is None and scheduler == "asha" and has_ray))


def tune_bounds(
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loader: Iterable,
    val_loader: Iterable,
    *,
    rules: Sequence[str] = LOSS_RULES,
    policy: str = "one_cycle",
    steps: int = 100,
    metric_fn: Callable[[nn.Module, Iterable], float] | None = None,
    seeds: int = 1,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    num_iters: int | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    bounds_divisor: float = 4.0,
    eval_every: int = 0,
    device: str | torch.device | None = None,
    amp: torch.dtype | None = None,
    scheduler: str = "fifo",
    use_ray: bool | None = None,
    cpus_per_trial: float = 1,
    max_concurrent: int | None = None,
    track: bool = True,
    progress: bool = True,
) -> TunedBounds:
    """Which rule's bounds train best, decided by training: `lr_find` once, then each rule's
    candidate bounds trained for a short budget and scored on validation data.

    Rules with the same bounds train once; ties go to the first rule in `rules`. The caller's
    model, optimizer, RNGs and the loaders' order are not touched: every model comes from
    `make_model()`.

    Args:
        make_model: builds a fresh model (called once for the range test, once per candidate
            and seed).
        make_optimizer: builds the optimizer of a model (its lrs are set by the test and the
            schedule).
        loader: the training batches (as for `lr_find`).
        val_loader: the held-out batches every candidate is scored on.
        rules: the rules whose bounds are candidates (default: every loss rule).
        policy: the CLR policy the candidates train with (`clr_scheduler`; a cyclic policy
            makes one cycle over `steps`).
        steps: optimizer steps each candidate trains for.
        metric_fn: `metric_fn(model, val_loader) -> float`, higher is better; default:
            accuracy of `(x, y)` batches.
        seeds: K range tests (median bounds, as lr_find) and every candidate trained from K
            seeds (seed .. seed+K-1), scored by the mean.
        seed: the first seed.
        loss_fn: as for `lr_find` (default: cross-entropy of `(x, y)` batches).
        num_iters: range-test iterations, as for `lr_find`.
        start_lr: as for `lr_find`.
        end_lr: as for `lr_find`.
        bounds_divisor: base_lr = max_lr / bounds_divisor, as for `lr_find`.
        eval_every: held-out evaluation during the range test, as for `lr_find`.
        device: as for `lr_find` (default: the model's).
        amp: as for `lr_find`.
        scheduler: "fifo" (every candidate to the end) or "asha" (Ray Tune's ASHA stops those
            that trail at an epoch's end: they count as early_stopped, never winners).
        use_ray: run the candidates as Ray Tune trials (a local Ray unless one is running);
            None: with scheduler="asha" when Ray is installed (without Ray, asha warns and
            runs in process).
        cpus_per_trial: Ray resources per candidate.
        max_concurrent: Ray trials at once (None: as many as fit).
        track: log a parent run (the caller's active run, else a new one in its experiment;
            a child of it when it already holds a range test) and a child run per candidate.
        progress: progress bars.

    Returns:
        TunedBounds: the winner (rule, base_lr, max_lr, metric) and the table of every
        candidate.

    Raises:
        ValueError: a bad argument, in one line naming it, before anything runs.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import clr_mlflow
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(512, 8, generator=g)
        >>> y = (x[:, 0] + x[:, 1] > 0).long()
        >>> train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 384, 32)]
        >>> val = [(x[384:], y[384:])]
        >>> tuned = clr_mlflow.tune_bounds(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
        ...                                lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        ...                                train, val, rules=("valley", "min_div10"), steps=24, end_lr=100,
        ...                                track=False, progress=False)
        >>> tuned.rule in ("valley", "min_div10") and tuned.base_lr < tuned.max_lr
        True
    """
    on_ray = check(make_model, make_optimizer, loader, val_loader, rules, policy, steps, metric_fn, seeds, seed,
                   scheduler, use_ray, cpus_per_trial, max_concurrent, eval_every)
    rules = (rules,) if isinstance(rules, str) else tuple(rules)
    need(isinstance(track, bool), "track", "True or False as", track)
    need(isinstance(progress, bool), "progress", "True or False as", progress)
    try:
        dev = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        need(False, "device", "None, a torch.device or a device name such as 'cpu' or 'cuda:0' as", device)
    setup = Setup(make_model, make_optimizer, loader, val_loader, policy, steps, loss_fn, metric_fn, dev, amp,
                  progress)
    with _callers_state(setup):
        seed_everything(seed)
        model, optimizer = _build(setup)
        settings = dict(num_iters=num_iters or 100, start_lr=start_lr, end_lr=end_lr, bounds_divisor=bounds_divisor,
                        seeds=seeds, eval_every=eval_every)
        found = lr_find(model, optimizer, loader, loss_fn=loss_fn, num_iters=num_iters, start_lr=start_lr,
                        end_lr=end_lr, bounds_divisor=bounds_divisor, seeds=seeds, eval_every=eval_every,
                        val_loader=val_loader if eval_every else None, metric_fn=metric_fn, bounds_rule=PROBE_RULE,
                        device=device, amp=amp, track=False, progress=progress)
        with ExitStack() as stack:
            run_id = None
            if track:
                from clr_mlflow.tracking import runs as tracking

                params = {"tune.rules": ",".join(rules), "tune.policy": policy, "tune.steps": steps,
                          "tune.seeds": seeds, "tune.seed": seed, "tune.scheduler": scheduler, "tune.ray": on_ray}
                tags = {"clr_mlflow.kind": "tune"} | tracking.provenance_tags(str(dev or model_device(model)))
                run_id = stack.enter_context(tracking.run_scope(tags, params=params, taken_by="range_test/lr"))
                tracking.log_params(params, run_id=run_id)
            tuned = tune_candidates(found, setup, rules, seeds=seeds, seed=seed, on_ray=on_ray, scheduler=scheduler,
                                    cpus_per_trial=cpus_per_trial, max_concurrent=max_concurrent, parent=run_id)
            if run_id:
                from clr_mlflow.api.tune_record import record_tuned  # mlflow loads when tracking is asked for

                record_tuned(run_id, tuned, settings, model, optimizer, loss_fn or CrossEntropy(),
                             dev or model_device(model), amp)
    return dataclasses.replace(tuned, run_id=run_id)


def tune_candidates(found: RangeTestResult, setup: Setup, rules: Sequence[str], *, seeds: int = 1, seed: int = 0,
                    on_ray: bool = False, scheduler: str = "fifo", cpus_per_trial: float = 1,
                    max_concurrent: int | None = None, parent: str | None = None) -> TunedBounds:
    """Train every rule's bounds of `found` (its table) as tune_bounds describes, log a child
    run of `parent` per candidate (when given), and pick the winner. Leaves RNGs and the
    loaders' order as they were."""
    bounds = found.bounds.set_index("rule")
    jobs: dict[tuple, list[str]] = {}  # (base_lr, max_lr) -> the rules that gave them
    for rule in rules:
        lo, hi = float(bounds.loc[rule, "base_lr"]), float(bounds.loc[rule, "max_lr"])
        if math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi:
            jobs.setdefault((lo, hi), []).append(rule)
    setup = dataclasses.replace(setup, data_states=tuple(g.get_state() if g is not None else None
                                                         for g in _generators(setup)))
    keys = [(lo, hi, seed + k) for (lo, hi) in jobs for k in range(seeds)]
    with _callers_state(setup):
        if on_ray:
            from clr_mlflow.api.tune_ray import on_ray as run_on_ray

            done = {k: Outcome(**o) for k, o in run_on_ray(setup, keys, scheduler == "asha", cpus_per_trial,
                                                           max_concurrent, train_candidate).items()}
        else:
            done = {key: train_candidate(setup, *key) for key in keys}
    if parent:
        from clr_mlflow.api.tune_record import _log_candidate  # mlflow loads when tracking is asked for
    runs = {bounds_: _log_candidate(parent, jobs[bounds_], bounds_, setup, {k: done[k] for k in done
                                                                               if k[:2] == bounds_})
            for bounds_ in jobs} if parent else {}
    rows = []
    for rule in rules:
        lo, hi = float(bounds.loc[rule, "base_lr"]), float(bounds.loc[rule, "max_lr"])
        got, first = [o for k, o in done.items() if k[:2] == (lo, hi)], jobs.get((lo, hi), [rule])[0]
        metrics = np.array([o.metric for o in got]) if _outcome(got) == "finished" else np.full(1, np.nan)
        note = f"same bounds as {first}: trained once" if first != rule else ""
        rows.append({"rule": rule, "base_lr": lo, "max_lr": hi, "metric": float(metrics.mean()),
                     "metric_min": float(metrics.min()), "metric_max": float(metrics.max()), "outcome": _outcome(got),
                     "selected": False, "run_id": runs.get((lo, hi)),
                     "note": note if got else str(bounds.loc[rule, "note"])})
    table = pd.DataFrame(rows, columns=COLUMNS)
    scores = table["metric"].to_numpy(float)
    if np.isfinite(scores).any():
        best = int(np.nanargmax(scores))  # the first of equal scores
        table.loc[best, "selected"] = True
        win = table.loc[best]
        chosen = found.bounds.assign(selected=found.bounds["rule"] == win["rule"])
        found = dataclasses.replace(found, bounds=mark_disagreement(chosen), bounds_rule=str(win["rule"]))
        return TunedBounds(str(win["rule"]), float(win["base_lr"]), float(win["max_lr"]), float(win["metric"]), table,
                           found, setup.policy, setup.steps)
    found = dataclasses.replace(found, bounds=found.bounds.assign(selected=False), bounds_rule="tuned")  # none won
    return TunedBounds("", float("nan"), float("nan"), float("nan"), table, found, setup.policy, setup.steps)


def verdict(tuned: TunedBounds) -> str:
    """One line: the winner and every candidate's score (or outcome)."""
    others = ", ".join(f"{r.rule} {r.metric:.4f}" if r.outcome == "finished" else f"{r.rule} {r.outcome}"
                       for r in tuned.table.itertuples() if not r.selected)
    head = (f"{tuned.rule} won with validation metric {tuned.metric:.4f}" if tuned.rule else "no rule's bounds trained")
    return f"{head} after {tuned.steps} iterations of {tuned.policy} ({others or 'no other candidate'})"


