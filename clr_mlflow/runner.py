"""One invocation, start to end: validate, load data, then range test and/or training, all
logged into one MLflow run. Everything that can be wrong with the input is found before
the run is created."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import torch

from . import data as data_mod
from . import history, plots, tracking
from .batches import Batches, channel_stats
from .bounds import bounds_frame, suggest_bounds
from .config import COMMANDS, RANGE, TRAIN, Config, ConfigError, validate
from .curve import sweep_lrs
from .engine import make_optimizer, pick_device, seed_everything, use_fast_kernels
from .models import build_model
from .presets import apply_preset
from .range_test import RangeTestResult, range_test
from .schedules import CLR_MODES, CyclicLR, ScheduleLR, make_schedule
from .training import TrainResult, train


class NoBounds(RuntimeError):
    """The chosen rule found no bounds on this curve, so there is nothing to train with."""


@dataclass
class Outcome:
    run_id: str
    config: Config  # with the preset applied
    range_test: RangeTestResult | None = None
    bounds_table: pd.DataFrame | None = None
    bounds: tuple[float, float, str] | None = None  # base_lr, max_lr, rule
    training: TrainResult | None = None
    range_test_seconds: float = 0.0

    def summary(self) -> str:
        cfg = self.config
        parts = [f"run {self.run_id}"]
        if self.range_test is not None:
            parts.append(f"range test: {len(self.range_test.lrs)} it, {self.range_test.stop_reason}")
        if self.bounds:
            parts.append(f"bounds {self.bounds[0]:.4g}-{self.bounds[1]:.4g} ({self.bounds[2]})")
        if self.training is not None:
            t = self.training
            parts.append(f"{cfg.policy}: best test acc {t.best_accuracy:.4f}, final {t.final_accuracy:.4f}, "
                         f"{t.seconds + self.range_test_seconds:.1f}s")
        return " | ".join(parts)


def execute(cfg: Config, command: str, tags: dict | None = None) -> Outcome:
    """Run a command's phases (range test, training, or both chained) into one MLflow run.
    `cfg` is the config as the user gave it; a preset is applied here."""
    requested = phases = COMMANDS[command]
    given_cfg = cfg
    cfg, from_preset = apply_preset(cfg)
    validate(cfg, phases, require_bounds=RANGE not in phases)
    given = (cfg.base_lr, cfg.max_lr, "preset" if "max_lr" in from_preset else "given") if cfg.max_lr > 0 else None
    if TRAIN in phases and cfg.bounds_from:
        try:
            given = history.chosen_bounds(cfg.bounds_from)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if given and RANGE in phases:
        phases = tuple(p for p in phases if p != RANGE)  # bounds known: no range test needed
    device = pick_device(cfg.device)
    use_fast_kernels(device)
    ds = data_mod.load(cfg.data, cfg.data_dir, cfg.limit_train, cfg.limit_test, cfg.image_size, cfg.seed)
    if len(ds.train) < cfg.batch_size:
        raise ConfigError(f"Expected batch_size <= the {len(ds.train)} training images, but got {cfg.batch_size}")
    seed_everything(cfg.seed)
    model = build_model(cfg.model, len(ds.classes), cfg.image_size).to(device)
    # channels_last: oneDNN's CPU convolutions and pooling and cuDNN's tensor cores are both
    # faster on NHWC (measured on the CPU: a range test 1.3x faster, docs/BENCHMARKS.md).
    model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.compile else model  # same weights; `model` saves clean keys
    mean, std = channel_stats(ds.train)
    train_b = Batches(ds.train, cfg.batch_size, device, mean, std, cfg.augment, cfg.seed, channels_last=True)
    test_b = Batches(ds.test, max(cfg.batch_size, 512), device, mean, std, False, cfg.seed, channels_last=True)
    num_iters = cfg.num_iters or len(train_b)
    if RANGE in phases and num_iters < 2:
        raise ConfigError(f"Expected num_iters >= 2, but one epoch is {num_iters} batch(es): set num_iters")
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr_start, cfg.momentum, cfg.nesterov, cfg.weight_decay)

    tags = tracking.provenance_tags(str(device)) | {"clr_mlflow.kind": "+".join(phases),
                                                    "clr_mlflow.command": command} | (tags or {})
    with tracking.active_run(cfg.experiment, cfg.run_name, tags) as run, \
            tracking.MetricBuffer(run.info.run_id, log_every=cfg.log_every) as sink:
        out = Outcome(run.info.run_id, cfg)
        # Params keep the values as given (base_lr=0 means "from the range test"), so a run can
        # be repeated from its params; what training actually used is logged as effective.*.
        tracking.log_params(given_cfg.params(requested) | ds.describe()
                            | {f"effective.{k}": v for k, v in from_preset.items()})
        if RANGE in phases:
            t0 = time.perf_counter()
            out.range_test, out.bounds_table, out.bounds = _range_test_phase(cfg, net, optimizer, train_b, test_b,
                                                                             num_iters, sink)
            out.range_test_seconds = time.perf_counter() - t0
            tracking.log_metrics({"time/range_test_seconds": out.range_test_seconds})
        else:
            out.bounds = given
        if TRAIN in phases:
            if out.bounds is None:
                raise NoBounds(f"bounds_rule {cfg.bounds_rule} found no bounds on this curve (see range_test/bounds.json"
                               " and curve.png): pass base_lr and max_lr, or choose another bounds_rule")
            out.training = _train_phase(cfg, net, model, optimizer, train_b, test_b, out, sink)
    return out


def _range_test_phase(cfg, model, optimizer, train_b, test_b, num_iters, sink):
    lrs = sweep_lrs(cfg.lr_start, cfg.lr_end, num_iters, cfg.sweep)
    result = range_test(model, optimizer, train_b, lrs, beta=cfg.beta, diverge=cfg.diverge,
                        held_out=test_b if cfg.eval_every else None, eval_every=cfg.eval_every, sink=sink)
    suggestions = suggest_bounds(result.lrs, result.smoothed, result.eval_lrs, result.accuracies, cfg.bounds_divisor)
    table = bounds_frame(suggestions, cfg.bounds_rule)
    curve = result.to_frame()
    tracking.log_table(table, tracking.BOUNDS_TABLE)
    tracking.log_frame_csv(curve, "range_test/curve.csv")
    tracking.log_figure(plots.range_test_figure(curve, table, log_x=cfg.sweep == "exp"), "range_test/curve.png")
    chosen = next(s for s in suggestions if s.rule == cfg.bounds_rule)
    tracking.set_tags({"bounds_rule": cfg.bounds_rule, "range_test.stop_reason": result.stop_reason})
    tracking.log_metrics({"range_test/iterations": len(result.lrs)})
    if not chosen.ok:
        print(f"bounds_rule {cfg.bounds_rule} gave no suggestion: {chosen.note}")
        return result, table, None
    tracking.log_metrics({"bounds/base_lr": chosen.base_lr, "bounds/max_lr": chosen.max_lr})
    return result, table, (chosen.base_lr, chosen.max_lr, cfg.bounds_rule)


def _train_phase(cfg, net, model, optimizer, train_b, test_b, out: Outcome, sink) -> TrainResult:
    base_lr, max_lr, rule = out.bounds
    ipe = len(train_b)
    step_size = cfg.step_size or max(1, round(cfg.step_epochs * ipe))
    total = cfg.iterations or (cfg.epochs * ipe if cfg.epochs > 0 else cfg.cycles * 2 * step_size)
    if cfg.epochs > 0 and not cfg.iterations and total % (2 * step_size) and cfg.policy in CLR_MODES:
        print(f"note: epochs={cfg.epochs} is {total / (2 * step_size):.2f} cycles of {2 * step_size} iterations; "
              "the paper advises whole cycles (use cycles instead of epochs)")
    schedule = make_schedule(cfg.policy, base_lr, max_lr, step_size, total, cfg.gamma, cfg.anneal_frac,
                             cfg.anneal_div)
    if out.range_test is not None:
        source = "range_test"
    elif cfg.bounds_from:
        source = f"run:{cfg.bounds_from}"
    else:
        source = f"preset:{cfg.preset}" if rule == "preset" else "given"
    tracking.log_params({
        "bounds_source": source, "effective.base_lr": base_lr, "effective.max_lr": max_lr,
        "effective.step_size": step_size, "total_iters": total, "iters_per_epoch": ipe})
    tracking.set_tags({"policy": cfg.policy, "bounds_rule": rule})
    if out.range_test is None:
        tracking.log_metrics({"bounds/base_lr": base_lr, "bounds/max_lr": max_lr})
    momentum = (cfg.base_momentum, cfg.max_momentum) if cfg.cycle_momentum else None
    scheduler = ScheduleLR(optimizer, schedule, momentum)
    result = train(net, optimizer, scheduler, train_b, test_b, total, beta=cfg.beta, sink=sink)
    cycle_len = 2 * step_size if isinstance(schedule, CyclicLR) else None
    tracking.log_figure(plots.schedule_figure(result.lrs, cycle_len), "train/schedule.png")
    tracking.log_figure(plots.training_figure(result.epochs, result.lrs), "train/curves.png")
    tracking.log_frame_csv(result.epochs, "train/epochs.csv")
    tracking.log_frame_csv(result.to_frame(), "train/curve.csv")
    tracking.log_metrics({"test/accuracy": result.final_accuracy, "test/best_accuracy": result.best_accuracy,
                        "time/train_seconds": result.seconds}
                       | ({"time/range_test_seconds": 0.0} if out.range_test is None else {}))
    if cfg.save_model:
        tracking.log_state_dict(model.state_dict(), "train/model.pt")
    return result
