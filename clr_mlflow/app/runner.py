"""One invocation, start to end: validate, load data, then range test and/or training, all
logged into one MLflow run. Everything that can be wrong with the input is found before
the run is created."""
from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pandas as pd
import torch

from clr_mlflow.tracking import assets
from clr_mlflow.core import checkpoint
from clr_mlflow.core import distributed
from clr_mlflow.tracking import history
from clr_mlflow.core import plots
from clr_mlflow.data import plugins
from clr_mlflow.tracking import runs as tracking
from clr_mlflow.app.config import COMMANDS, RANGE, TRAIN, TUNED, Config, ConfigError, flush_seconds, validate
from clr_mlflow.core.engine import NullSink, make_optimizer, pick_device, seed_everything, use_fast_kernels
from clr_mlflow.api import tune, tune_record
from clr_mlflow.api.finder import MIN_STEPS, lr_find
from clr_mlflow.tracking.iteration_logger import IterationLogger
from clr_mlflow.app.loaders import Loaders, load_loaders
from clr_mlflow.data.models import build_model
from clr_mlflow.app.presets import apply_preset, param_groups
from clr_mlflow.core.range_test import RangeTestResult
from clr_mlflow.core.schedules import CLR_MODES, CyclicLR, ScheduleLR, make_schedule
from clr_mlflow.core.steps import CrossEntropy, Stepper, classification_eval, evaluate
from clr_mlflow.core.training import TrainResult, train


@dataclass(frozen=True)
class Resumption:
    """An interrupted run to continue in place (see resume.py)."""
    run_id: str
    state: dict         # its checkpoint (checkpoint.py), with the bounds it trained with
    logged: dict[str, int]  # metric -> its last step already in the run: only later steps are logged


class NoBounds(RuntimeError):
    """The chosen rule found no bounds on this curve, so there is nothing to train with."""


@dataclass
class Outcome:
    run_id: str | None  # None on torchrun ranks other than 0, which log nothing
    config: Config  # with the preset applied
    range_test: RangeTestResult | None = None
    bounds_table: pd.DataFrame | None = None
    bounds: tuple[float, float, str] | None = None  # base_lr, max_lr, rule
    training: TrainResult | None = None
    test_accuracy: float | None = None  # the test split, evaluated once after training
    ranks_agree: bool | None = None     # under torchrun: every rank ended with the same weights
    loaders: Loaders | None = None
    range_test_seconds: float = 0.0
    tuned: tune.TunedBounds | None = None  # bounds_rule=tuned: every candidate rule's short training

    def summary(self) -> str:
        cfg = self.config
        parts = [f"run {self.run_id}"]
        if self.range_test is not None:
            parts.append(f"range test: {len(self.range_test.lrs)} iterations, {self.range_test.stop_reason}")
        if self.bounds and self.training is not None and cfg.policy == "fixed":
            parts.append(f"lr {self.bounds[0]:.4g} ({self.bounds[2]} base_lr)")  # fixed uses base_lr only
        elif self.bounds:
            parts.append(f"bounds {self.bounds[0]:.4g}-{self.bounds[1]:.4g} ({self.bounds[2]})")
        if self.training is not None:
            t = self.training
            parts.append(f"{cfg.policy}: val acc {t.final_accuracy:.4f} (best {t.best_accuracy:.4f}), test acc "
                         f"{self.test_accuracy:.4f}, {t.seconds + self.range_test_seconds:.1f}s")
        return " | ".join(parts)

    def description(self) -> list[str]:
        """A few lines for the run's description in the MLflow UI."""
        cfg, lines = self.config, []
        if self.range_test is not None:
            r = self.range_test
            lines.append(f"Range test: {len(r.lrs)} iterations, lr {r.lrs[0]:.3g} to {r.lrs[-1]:.3g} "
                         f"({r.stop_reason}); plot range_test/curve.png, table range_test/bounds.json.")
        if self.tuned is not None:
            lines.append(f"Tuned: {tune.verdict(self.tuned)}; table tune/candidates.json, a child run per candidate.")
        if self.bounds:
            lines.append(f"Bounds: base_lr {self.bounds[0]:.4g}, max_lr {self.bounds[1]:.4g} ({self.bounds[2]}).")
        elif self.range_test is not None:
            lines.append(f"Bounds: rule {cfg.bounds_rule} found none on this curve (see the table's notes).")
        if self.training is not None:
            t = self.training
            lines.append(f"Training: {cfg.policy}, {len(t.lrs)} iterations in {t.seconds:.0f} s; validation accuracy "
                         f"{t.final_accuracy:.4f} (best {t.best_accuracy:.4f}), test accuracy "
                         f"{self.test_accuracy:.4f}; plots train/curves.png and train/schedule.png.")
        return lines


def execute(cfg: Config, command: str, tags: dict | None = None,
            on_epoch: Callable[[dict], None] | None = None, resume: Resumption | None = None) -> Outcome:
    """Run a command's phases (range test, training, or both chained) into one MLflow run.
    `cfg` is the config as the user gave it; a preset is applied here. `on_epoch(row)` is
    called after every training epoch with its row (epoch, step, val_accuracy, ...).
    `resume`: continue that run's training from its checkpoint, in the same run."""
    requested = phases = COMMANDS[command]
    given_cfg = cfg
    cfg, from_preset = apply_preset(cfg)
    validate(cfg, phases, require_bounds=RANGE not in phases and resume is None)
    try:  # before anything reads the store (bounds_from) or loads data
        tracking.check_store(cfg.experiment)
    except tracking.StoreError as e:
        raise ConfigError(str(e)) from None
    given = (cfg.base_lr, cfg.max_lr, "preset" if "max_lr" in from_preset else "given") if cfg.max_lr > 0 else None
    if resume is not None:  # the range test (if any) is done: train on with the bounds it gave
        phases, given = (TRAIN,), tuple(resume.state["bounds"])
    elif TRAIN in phases and cfg.bounds_from:
        try:
            given = history.chosen_bounds(cfg.bounds_from)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if given and RANGE in phases and TRAIN in phases:
        phases = (TRAIN,)  # bounds known: no range test needed (a range-test command always tests)
    ranks, device = distributed.init(pick_device(cfg.device))
    if RANGE in phases and cfg.bounds_rule == TUNED and ranks.world > 1:
        raise ConfigError(f"Expected bounds_rule=tuned in one process (its candidates train unsharded), but got "
                          f"{ranks.world} (torchrun): tune first, then train with bounds_from")
    if resume is not None and resume.state.get("world_size", 1) != ranks.world:  # each rank's shard differs
        raise ConfigError(f"Expected to resume run {resume.run_id} with {resume.state.get('world_size', 1)} "
                          f"process(es) as it was trained, but got {ranks.world}")
    use_fast_kernels(device)
    loaders = load_loaders(cfg, device, (ranks.rank, ranks.world))
    seed_everything(cfg.seed)
    try:
        model = build_model(cfg.model, loaders.num_classes, cfg.image_size).to(device)
    except plugins.PluginError as e:
        raise ConfigError(str(e)) from None
    # channels_last: oneDNN's CPU convolutions and pooling and cuDNN's tensor cores are both
    # faster on NHWC (measured on the CPU: a range test 1.3x faster, docs/BENCHMARKS.md).
    model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.compile else model  # same weights; `model` saves clean keys
    if ranks.world > 1:  # gradients averaged over the ranks; the module keeps `model`'s weights
        net = torch.nn.parallel.DistributedDataParallel(net)
    num_iters = cfg.num_iters or len(loaders.train)
    # num_iters iterations run across epochs (the loader starts again); only "one epoch"
    # (num_iters=0) depends on the epoch's length.
    if RANGE in phases and not cfg.num_iters and len(loaders.train) < MIN_STEPS:
        raise ConfigError(f"Expected at least {MIN_STEPS} batches per epoch for a one-epoch range test (num_iters=0), "
                          f"but the training set gives {len(loaders.train)} of batch_size={cfg.batch_size}: set "
                          f"num_iters (e.g. --num-iters 100; the range test runs across epochs)")
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr_start, cfg.momentum, cfg.nesterov, cfg.weight_decay,
                               param_groups(cfg, model))
    # bf16 autocast on CUDA (no loss scaling needed); plain fp32 on the CPU.
    stepper = Stepper(net, optimizer, CrossEntropy(), device, amp=torch.bfloat16 if device.type == "cuda" else None)

    tags = tracking.provenance_tags(str(device)) | {"clr_mlflow.kind": "+".join(phases),
                                                    "clr_mlflow.command": command} | (tags or {})
    # Under torchrun only rank 0 makes the run and logs; the others compute alongside.
    run_scope = tracking.active_run(cfg.experiment, cfg.run_name, tags, run_id=resume and resume.run_id,
                                    system_metrics=TRAIN in phases and cfg.system_metrics) \
        if ranks.leader else contextlib.nullcontext()
    with run_scope as run:
        out = Outcome(run.info.run_id if run else None, cfg, loaders=loaders)
        if run and resume is None:
            # Params keep the values as given (base_lr=0 means "from the range test"), so a run
            # can be repeated from its params; what training actually used is effective.*.
            tracking.log_params(given_cfg.params(requested) | loaders.params
                                | {f"effective.{k}": v for k, v in from_preset.items()}
                                | {"world_size": ranks.world, "global_batch_size": cfg.batch_size * ranks.world})
            p = loaders.params
            assets.log_datasets(p["data.source"], p["data.digest"], {
                "training": p["data.train_size"], "validation": p["data.val_size"], "test": p["data.test_size"]},
                loaders.num_classes)
        if RANGE in phases:
            t0 = time.perf_counter()
            tuned = cfg.bounds_rule == TUNED  # lr_find's table is logged once the candidates have chosen
            out.range_test = lr_find(
                net, optimizer, loaders.train, loss_fn=stepper.loss_fn, num_iters=num_iters, start_lr=cfg.lr_start,
                end_lr=cfg.lr_end, sweep=cfg.sweep, beta=cfg.beta, diverge=cfg.diverge,
                val_loader=loaders.val if cfg.eval_every else None, eval_every=cfg.eval_every,
                bounds_rule=tune.PROBE_RULE if tuned else cfg.bounds_rule, bounds_divisor=cfg.bounds_divisor,
                seeds=cfg.seeds, device=device, amp=stepper.amp, log_every=cfg.log_every,
                track=ranks.leader and not tuned, progress=ranks.leader)
            if tuned:
                out.tuned = _tune(cfg, loaders, device, out, net, optimizer, stepper)
                out.range_test = out.tuned.range_test
            out.range_test_seconds = time.perf_counter() - t0
            if run:
                tracking.log_metrics({"time/range_test_seconds": out.range_test_seconds})
            out.bounds_table = out.range_test.bounds
            try:
                out.bounds = (*out.tuned.suggest(), out.tuned.rule) if tuned else \
                    (*out.range_test.suggest(), cfg.bounds_rule)
            except ValueError as e:
                print(e)
        else:
            out.bounds = given
        if TRAIN in phases:
            if out.bounds is None:
                raise NoBounds(f"bounds_rule {cfg.bounds_rule} found no bounds on this curve (see range_test/bounds.json"
                               " and curve.png): pass base_lr and max_lr, or choose another bounds_rule")
            out.training = _train_phase(cfg, stepper, model, loaders, out, on_epoch, resume)
        if run:
            assets.describe_run(out.description())
    return out


def _tune(cfg: Config, loaders: Loaders, device, out: Outcome, net, optimizer, stepper: Stepper) -> tune.TunedBounds:
    """bounds_rule=tuned: every rule's bounds from the range test train cfg.tune_steps iterations
    of cfg.policy on fresh weights (seeded as the run's), scored on the validation split; the
    candidates are child runs, and the range test is logged with the winner selected."""
    def make_model():
        return build_model(cfg.model, loaders.num_classes, cfg.image_size).to(device) \
            .to(memory_format=torch.channels_last)

    def make_opt(model):
        return make_optimizer(model, cfg.optimizer, cfg.lr_start, cfg.momentum, cfg.nesterov, cfg.weight_decay,
                              param_groups(cfg, model))

    rules = tune.LOSS_RULES + (("accuracy",) if cfg.eval_every else ())
    setup = tune.Setup(make_model, make_opt, loaders.train, loaders.val, cfg.policy, cfg.tune_steps, device=device,
                       amp=stepper.amp, progress=out.run_id is not None)
    tuned = tune.tune_candidates(out.range_test, setup, rules, seed=cfg.seed, parent=out.run_id)
    print(f"tuned: {tune.verdict(tuned)}")
    if out.run_id:
        settings = dict(start_lr=cfg.lr_start, end_lr=cfg.lr_end, num_iters=cfg.num_iters or len(loaders.train),
                        sweep=cfg.sweep, beta=cfg.beta, diverge=cfg.diverge, accumulate=1, eval_every=cfg.eval_every,
                        bounds_divisor=cfg.bounds_divisor, seeds=cfg.seeds)
        tune_record.record_tuned(out.run_id, tuned, settings, net, optimizer, stepper.loss_fn, device, stepper.amp,
                          cfg.log_every)
        tracking.log_params({"effective.bounds_rule": tuned.rule or "none"})
    return tuned


def _train_phase(cfg: Config, stepper: Stepper, model, loaders: Loaders, out: Outcome, on_epoch,
                 resume: Resumption | None) -> TrainResult:
    base_lr, max_lr, rule = out.bounds
    ipe = len(loaders.train)
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
    if out.run_id:
        tracking.log_params({
            "bounds_source": source, "effective.base_lr": base_lr, "effective.max_lr": max_lr,
            "effective.step_size": step_size, "total_iters": total, "iters_per_epoch": ipe})
        tracking.set_tags({"policy": cfg.policy, "bounds_rule": rule})
        if out.range_test is None and resume is None:
            tracking.log_metrics({"bounds/base_lr": base_lr, "bounds/max_lr": max_lr})
    momentum = (cfg.base_momentum, cfg.max_momentum) if cfg.cycle_momentum else None
    scheduler = ScheduleLR(stepper.optimizer, schedule, momentum)
    evaluator = classification_eval(stepper.device, stepper.amp)
    logger = IterationLogger(out.run_id, log_every=cfg.log_every, flush_seconds=flush_seconds()) if out.run_id \
        else contextlib.nullcontext(NullSink())
    with logger as sink, tempfile.TemporaryDirectory(prefix="clr_mlflow-") as workdir:
        save = checkpoint_writer(out.run_id, out.bounds, Path(workdir), sink.flush) if out.run_id else None
        if resume is not None:
            sink = After(sink, resume.logged)
        result = train(stepper, scheduler, loaders.train, total, val_loader=loaders.val, evaluator=evaluator,
                       beta=cfg.beta, sink=sink, progress=out.run_id is not None, on_epoch=on_epoch,
                       checkpoint_every=cfg.checkpoint_every, on_checkpoint=save,
                       resume=resume.state if resume else None)
    if distributed.active():  # all ranks together, before rank 0 goes on to log
        out.ranks_agree = distributed.same_weights_everywhere(model)
    # The test split, once, after training: nothing (bounds, epochs) was chosen on it.
    test = evaluate(evaluator, stepper.model, loaders.test)
    out.test_accuracy = test["accuracy"]
    if not out.run_id:
        return result
    if out.ranks_agree is not None:
        tracking.set_tags({"ddp.weights_identical": str(out.ranks_agree).lower()})
    cycle_len = 2 * step_size if isinstance(schedule, CyclicLR) else None
    titles = dict(policy=cfg.policy, bounds=(base_lr, max_lr))
    tracking.log_figure(plots.schedule_figure(result.lrs, cycle_len, **titles), "train/schedule.png")
    tracking.log_figure(plots.training_figure(result.epochs, result.lrs, **titles), "train/curves.png")
    tracking.log_frame_csv(result.epochs, "train/epochs.csv")
    tracking.log_frame_csv(result.to_frame(), "train/curve.csv")
    tracking.log_metrics({"test/accuracy": test["accuracy"], "test/loss": test["val_loss"],
                          "val/best_accuracy": result.best_accuracy, "time/train_seconds": result.seconds})
    if cfg.save_model:
        assets.log_model(model, loaders.example)
    return result


CHECKPOINTED: set[str] = set()  # runs this process wrote a checkpoint for (the CLI says how to resume them)


def checkpoint_writer(run_id: str, bounds: tuple, workdir: Path,
                      flush_series: Callable[[], None]) -> Callable[[dict], None]:
    """The loop's on_checkpoint: the state and the bounds, saved whole, as the run's artifact.
    The series up to the checkpoint go to the spool first (`flush_series`): a process killed
    after the checkpoint must not lose steps a resume will not run again."""
    def save(state: dict) -> None:
        flush_series()
        world = torch.distributed.get_world_size() if distributed.active() else 1
        path = checkpoint.save(state | {"bounds": list(bounds), "world_size": world}, workdir / checkpoint.FILE)
        tracking.log_artifact_file(path, checkpoint.ARTIFACT_DIR)
        CHECKPOINTED.add(run_id)

    return save


class After:
    """A sink passing on, per metric, only the steps after the last one the run already has
    (`last`: key -> step): a run that failed after its last checkpoint logged some iterations
    the resumed loop runs again, and MLflow would keep both copies."""

    def __init__(self, sink, last: dict[str, int]):
        self.sink, self.last = sink, last

    def _send(self, method, steps, values: dict) -> None:
        steps = np.asarray(steps)
        for key, vals in values.items():
            keep = steps > self.last.get(key, -1)
            if keep.any():
                method(steps[keep], {key: np.asarray(vals)[keep]})

    def series(self, steps, values: dict) -> None:
        self._send(self.sink.series, steps, values)

    def points(self, steps, values: dict) -> None:
        self._send(self.sink.points, steps, values)
