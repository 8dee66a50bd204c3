"""Every user-facing parameter, declared once: its type, default, help and which commands take
it. The CLI's options, the MLflow params and the MLproject entry points all come from here,
and `validate` checks values before anything touches a model or the tracking store.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

from clr_mlflow.data import plugins
from clr_mlflow.core.checks import need
from clr_mlflow.core.bounds import RULES
from clr_mlflow.core.curve import SWEEPS
from clr_mlflow.data.models import MODELS
from clr_mlflow.core.schedules import CLR_MODES, POLICIES

OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")
TUNED = "tuned"  # bounds_rule: let short trainings choose among the rules (api/tune.py)

RANGE, TRAIN = "range_test", "train"  # the two phases a parameter can belong to
COMMANDS = {"range-test": (RANGE,), "train": (TRAIN,), "run": (RANGE, TRAIN)}  # command -> its phases
ENTRY_POINTS = {"main": "run", "range_test": "range-test", "train": "train"}  # MLproject entry point -> command


class ConfigError(ValueError):
    """A parameter value that cannot be used; the message names the parameter."""


def _p(default, help: str, phases=(RANGE, TRAIN)):
    return field(default=default, metadata={"help": help, "phases": phases})


@dataclass(frozen=True)
class Config:
    # data
    data: str = _p("cifar10", "'cifar10' (torchvision download into data_dir), a folder with train/ and test/ in ImageFolder layout, or module.path:callable returning (train, test) datasets")
    data_dir: str = _p("data", "where torchvision downloads CIFAR-10 and decoded images are cached")
    limit_train: int = _p(0, "use a seeded, class-balanced subset of this many training images (0 = all)")
    limit_test: int = _p(0, "use a seeded, class-balanced subset of this many test images (0 = all)")
    val_fraction: float = _p(0.1, "share of the training images held out (seeded, class-balanced) for validation: the range test's accuracy and every val/* metric; the test split is evaluated once, after training (0 = validate on the test split)")
    image_size: int = _p(32, "images are resized to image_size x image_size when they differ")
    augment: bool = _p(True, "random crop (padding 4) and horizontal flip of training batches")
    # model and optimizer
    model: str = _p("small_cnn", f"one of {', '.join(MODELS)}, or module.path:callable(num_classes, image_size)")
    batch_size: int = _p(128, "images per optimizer step")
    optimizer: str = _p("sgd", f"one of {', '.join(OPTIMIZERS)}")
    momentum: float = _p(0.9, "SGD momentum, or AdamW beta1")
    nesterov: bool = _p(True, "Nesterov momentum (SGD only)")
    weight_decay: float = _p(5e-4, "weight decay (decoupled for AdamW)")
    seed: int = _p(0, "seed for weights, data order, augmentation and subsets")
    device: str = _p("auto", "auto (CUDA when available), cpu or cuda")
    experiment: str = _p("clr_mlflow", "MLflow experiment of the run (ignored inside `mlflow run`, which made the run)")
    run_name: str = _p("", "MLflow run name (empty: MLflow picks one)")
    log_every: int = _p(1, "log every n-th iteration's values to MLflow (the CSV artifacts keep all)")
    compile: bool = _p(False, "torch.compile the model (worth it on CUDA for long runs)")
    preset: str = _p("", "named settings filling every parameter left at its default: smith2017_cifar10 (the CLR paper's CIFAR-10 experiment)")
    # range test
    lr_start: float = _p(1e-5, "first lr of the range test", (RANGE,))
    lr_end: float = _p(10.0, "last lr of the range test", (RANGE,))
    num_iters: int = _p(0, "range-test iterations (0 = one epoch of the training set)", (RANGE,))
    sweep: str = _p("exp", f"lr spacing of the range test: {' or '.join(SWEEPS)}", (RANGE,))
    beta: float = _p(0.98, "EMA factor of the smoothed loss")
    diverge: float = _p(4.0, "stop the range test once the smoothed loss rises above its best by more than "
                             "(diverge - 1) x the loss's own scale (its drop to the best, or its noise)", (RANGE,))
    eval_every: int = _p(0, "held-out accuracy and loss every this many range-test iterations (0 = off)", (RANGE,))
    bounds_rule: str = _p("steepest", f"rule whose bounds are chosen: {', '.join(RULES)}, or tuned (run/main only: each rule's bounds train tune_steps iterations and the best on validation wins)", (RANGE,))
    tune_steps: int = _p(100, "bounds_rule=tuned: training iterations per candidate rule, each from the same start, scored by validation accuracy", (RANGE,))
    bounds_divisor: float = _p(4.0, "base_lr = max_lr / bounds_divisor for the loss rules", (RANGE,))
    seeds: int = _p(1, "range tests from this many initialisations and data orders; the bounds table gives each rule's median bounds and their spread", (RANGE,))
    # training
    policy: str = _p("triangular", f"lr policy: {', '.join(POLICIES)}", (TRAIN,))
    base_lr: float = _p(0.0, "lower lr bound (0 = from the range test or bounds_from)", (TRAIN,))
    max_lr: float = _p(0.0, "upper lr bound (0 = from the range test or bounds_from)", (TRAIN,))
    bounds_from: str = _p("", "run id of an earlier range test whose chosen bounds to train with", (TRAIN,))
    step_size: int = _p(0, "half-cycle length in iterations (0 = step_epochs epochs)", (TRAIN,))
    step_epochs: float = _p(4.0, "half-cycle length in epochs, used when step_size is 0", (TRAIN,))
    cycles: int = _p(2, "training length in whole cycles (2 x step_size iterations each)", (TRAIN,))
    epochs: int = _p(0, "training length in epochs; when > 0 it wins over cycles", (TRAIN,))
    iterations: int = _p(0, "training length in iterations; when > 0 it wins over epochs and cycles", (TRAIN,))
    gamma: float = _p(0.99994, "exp_range decay: amplitude x gamma**iteration", (TRAIN,))
    cycle_momentum: bool = _p(False, "cycle momentum (AdamW: beta1) opposite to the lr", (TRAIN,))
    base_momentum: float = _p(0.85, "momentum at max_lr when cycle_momentum", (TRAIN,))
    max_momentum: float = _p(0.95, "momentum at base_lr when cycle_momentum", (TRAIN,))
    anneal_frac: float = _p(0.1, "one_cycle: share of training spent annealing below base_lr", (TRAIN,))
    anneal_div: float = _p(100.0, "one_cycle: final lr = base_lr / anneal_div", (TRAIN,))
    checkpoint_every: int = _p(-1, "write the training state to the run's train/checkpoint.pt every this many iterations, for `clr-mlflow resume` (-1: at every epoch end, 0: never); unless 0, also when interrupted", (TRAIN,))
    save_model: bool = _p(True, "log the trained network as the run's Logged Model `model` (mlflow.pytorch.load_model)", (TRAIN,))
    system_metrics: bool = _p(True, "record CPU, memory, disk, network (and GPU) use as the run's system/* metrics", (TRAIN,))

    @classmethod
    def names(cls, phases: tuple[str, ...]) -> list[str]:
        """Parameters of a command that runs these phases, in declaration order."""
        return [f.name for f in fields(cls) if set(f.metadata["phases"]) & set(phases)]

    def params(self, phases: tuple[str, ...]) -> dict:
        return {n: getattr(self, n) for n in self.names(phases)}


_need = partial(need, error=ConfigError)  # the CLI prints a ConfigError as one line


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"Expected {name} to be one of {', '.join(choices)}, but got {value!r}")


def _plugin(name: str, spec: str) -> None:
    try:
        plugins.resolve(name, spec)
    except plugins.PluginError as e:
        raise ConfigError(str(e)) from None


# Beyond these a value is a typo, not a request (a 1e12-iteration range test would allocate
# its lr array first and fail minutes later).
LIMITS = {"num_iters": 10**7, "iterations": 10**9, "step_size": 10**9, "step_epochs": 10**6, "epochs": 10**6,
          "cycles": 10**6, "eval_every": 10**9, "lr_start": 1e6, "lr_end": 1e6, "base_lr": 1e6, "max_lr": 1e6,
          "bounds_divisor": 1e6, "diverge": 1e12, "anneal_div": 1e12, "batch_size": 10**7, "limit_train": 10**9,
          "limit_test": 10**9, "image_size": 4096, "log_every": 10**9, "checkpoint_every": 10**9, "tune_steps": 10**9, "weight_decay": 1e3, "seed": 2**32 - 1}


def _numbers(cfg: Config) -> None:
    """Every number finite and within LIMITS (NaN and inf slip through comparisons)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        _need(math.isfinite(value), f.name, "finite", value)
        limit = LIMITS.get(f.name)
        if limit is not None and value > limit:
            raise ConfigError(f"Expected {f.name} <= {limit:,.0f}, but got {value!r}")


STORE_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                 "uc")  # what MLflow opens as a tracking store ("": a folder)
DB_DRIVERS = {"postgresql": ("psycopg2", "psycopg2-binary"), "postgresql+psycopg2": ("psycopg2", "psycopg2-binary"),
              "postgresql+psycopg": ("psycopg", "psycopg[binary]"), "mysql": ("MySQLdb", "mysqlclient"),
              "mysql+pymysql": ("pymysql", "pymysql"), "mssql": ("pyodbc", "pyodbc")}  # SQLAlchemy's defaults


def _version(package: str) -> tuple[int, ...]:
    import importlib.metadata

    try:
        return tuple(int(p) for p in importlib.metadata.version(package).split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


def check_tracking_uri(uri: str, name: str = "MLFLOW_TRACKING_URI") -> None:
    """A tracking URI MLflow can open, checked before anything reads or writes the store: a
    scheme it knows, and a sqlite:/// file whose folder exists or can be made (MLflow's and
    the file system's errors are tracebacks naming neither the variable nor what it wants)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    _need(scheme in STORE_SCHEMES, name, "sqlite:///PATH, http(s)://HOST:PORT or a database URI "
          "(postgresql, mysql, mssql) as", uri)
    # MLflow 3 refuses its file store unless told otherwise (a traceback about "maintenance mode").
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
    _need(not uri or scheme not in ("", "file") or allowed, name, "a database store such as sqlite:///mlflow.db "
          "(MLflow's file store is in maintenance mode; MLFLOW_ALLOW_FILE_STORE=true opts in) as", uri)
    driver = DB_DRIVERS.get(uri.split("://", 1)[0])
    if uri.startswith("postgresql://") and _version("sqlalchemy") >= (2, 1):
        driver = DB_DRIVERS["postgresql+psycopg"]  # SQLAlchemy 2.1 made psycopg 3 its default
    _need(driver is None or importlib.util.find_spec(driver[0]) is not None, name,
          f"a database URI whose driver is installed (pip install {driver and driver[1]}) as", uri)
    if scheme != "sqlite":
        return
    _need(uri.startswith("sqlite:///") and len(uri) > len("sqlite:///"), name,
          "sqlite:///PATH (three slashes, then the path: sqlite:////abs/mlflow.db) as", uri)
    path = Path(uri.removeprefix("sqlite:///"))
    _need(not path.is_dir(), name, "a SQLite file, not a folder, as", uri)
    folder = path.parent
    while not folder.exists():  # the folder is made when missing: its nearest existing one must allow that
        folder = folder.parent
    why = "not writable" if folder.is_dir() else "a file"
    _need(folder.is_dir() and os.access(folder, os.W_OK | os.X_OK), name,
          f"a SQLite file whose folder exists or can be made ({folder} is {why}) as", uri)


def flush_seconds() -> float:
    """How often a training sends what it buffered, in seconds: CLR_MLFLOW_FLUSH_SECONDS
    (default 5). It bounds what a SIGKILL can lose and how soon an outage is noticed."""
    raw = os.environ.get("CLR_MLFLOW_FLUSH_SECONDS", "5")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    _need(math.isfinite(value) and 0 < value <= 3600, "CLR_MLFLOW_FLUSH_SECONDS", "seconds in (0, 3600] as", raw)
    return value


def validate(cfg: Config, phases: tuple[str, ...], require_bounds: bool = False) -> None:
    """Raise ConfigError naming the first bad parameter of a command running `phases`, or
    a MLFLOW_TRACKING_URI that no store can be opened at."""
    check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))
    flush_seconds()
    _numbers(cfg)
    _need(cfg.experiment.strip() != "", "experiment", "a non-empty name for", cfg.experiment)
    if plugins.is_plugin(cfg.model):
        _plugin("model", cfg.model)
    else:
        _choice("model", cfg.model, tuple(MODELS) + ("module.path:callable",))
    if plugins.is_plugin(cfg.data):
        _plugin("data", cfg.data)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("device", cfg.device, DEVICES)
    _need(cfg.batch_size >= 1, "batch_size", "positive integer", cfg.batch_size)
    _need(cfg.limit_train >= 0, "limit_train", "non-negative integer", cfg.limit_train)
    _need(cfg.limit_test >= 0, "limit_test", "non-negative integer", cfg.limit_test)
    _need(0 <= cfg.val_fraction < 1, "val_fraction", "value in [0, 1) for", cfg.val_fraction)
    _need(cfg.image_size >= 8, "image_size", "integer >= 8 for", cfg.image_size)
    _need(0 <= cfg.momentum < 1, "momentum", "value in [0, 1) for", cfg.momentum)
    _need(cfg.weight_decay >= 0, "weight_decay", "non-negative", cfg.weight_decay)
    _need(cfg.seed >= 0, "seed", "non-negative integer", cfg.seed)
    _need(0 <= cfg.beta < 1, "beta", "value in [0, 1) for", cfg.beta)
    _need(cfg.log_every >= 1, "log_every", "positive integer", cfg.log_every)
    if cfg.device == "cuda":
        import torch

        _need(torch.cuda.is_available(), "device", "an available device for", cfg.device)
    if RANGE in phases:
        _choice("sweep", cfg.sweep, SWEEPS)
        _choice("bounds_rule", cfg.bounds_rule, RULES + (TUNED,))
        if cfg.bounds_rule == TUNED and TRAIN not in phases:
            raise ConfigError("Expected bounds_rule to be one of " + ", ".join(RULES) + " for a range test alone "
                              "(tuned trains every rule's bounds: use the run command, or -e main), but got 'tuned'")
        _need(cfg.tune_steps >= 2, "tune_steps", "integer >= 2 for", cfg.tune_steps)
        _need(cfg.lr_start > 0, "lr_start", "positive", cfg.lr_start)
        _need(cfg.lr_end > cfg.lr_start, "lr_end", f"value > lr_start={cfg.lr_start} for", cfg.lr_end)
        _need(cfg.num_iters == 0 or cfg.num_iters >= 10, "num_iters", "0 (one epoch) or an integer >= 10 for",
              cfg.num_iters)
        _need(cfg.diverge > 1, "diverge", "value > 1 for", cfg.diverge)
        _need(cfg.eval_every >= 0, "eval_every", "non-negative integer", cfg.eval_every)
        _need(cfg.bounds_divisor > 1, "bounds_divisor", "value > 1 for", cfg.bounds_divisor)
        _need(1 <= cfg.seeds <= 1000, "seeds", "integer in [1, 1000] for", cfg.seeds)
        if cfg.bounds_rule == "accuracy" and cfg.eval_every == 0:
            raise ConfigError("Expected eval_every > 0 with bounds_rule=accuracy, but got eval_every=0")
    if TRAIN in phases:
        _choice("policy", cfg.policy, POLICIES)
        _need(cfg.base_lr >= 0, "base_lr", "positive (or 0 for a range test)", cfg.base_lr)
        _need(cfg.max_lr >= 0, "max_lr", "positive (or 0 for a range test)", cfg.max_lr)
        given = cfg.base_lr > 0 or cfg.max_lr > 0
        if given:
            _need(cfg.base_lr > 0, "base_lr", "positive (max_lr was given)", cfg.base_lr)
            _need(cfg.max_lr > cfg.base_lr, "max_lr", f"value > base_lr={cfg.base_lr} for", cfg.max_lr)
            if cfg.bounds_from:
                raise ConfigError("Expected either base_lr/max_lr or bounds_from, but got both")
        elif require_bounds and not cfg.bounds_from:
            raise ConfigError("Expected base_lr and max_lr (or bounds_from), but got neither")
        _need(cfg.step_size >= 0, "step_size", "non-negative integer", cfg.step_size)
        _need(cfg.step_epochs > 0, "step_epochs", "positive", cfg.step_epochs)
        _need(cfg.cycles >= 0, "cycles", "non-negative integer", cfg.cycles)
        _need(cfg.epochs >= 0, "epochs", "non-negative integer", cfg.epochs)
        _need(cfg.iterations >= 0, "iterations", "non-negative integer", cfg.iterations)
        if cfg.policy in CLR_MODES and cfg.iterations and cfg.step_size:
            _need(cfg.step_size <= cfg.iterations, "step_size", f"value <= iterations={cfg.iterations} (policy="
                  f"{cfg.policy} reaches max_lr after step_size iterations) for", cfg.step_size)
        _need(cfg.policy != "one_cycle" or cfg.iterations != 1, "iterations", "0 or an integer >= 2 "
              "(policy=one_cycle) for", cfg.iterations)
        _need(cfg.checkpoint_every >= -1, "checkpoint_every", "-1 (every epoch), 0 (never) or a positive integer for",
              cfg.checkpoint_every)
        if cfg.cycles == 0 and cfg.epochs == 0 and cfg.iterations == 0:
            raise ConfigError("Expected positive cycles, epochs or iterations, but got all three 0")
        _need(0 < cfg.gamma <= 1, "gamma", "value in (0, 1] for", cfg.gamma)
        _need(0 <= cfg.base_momentum < cfg.max_momentum < 1, "base_momentum/max_momentum",
              "0 <= base < max < 1 for", (cfg.base_momentum, cfg.max_momentum))
        _need(0 <= cfg.anneal_frac < 1, "anneal_frac", "value in [0, 1) for", cfg.anneal_frac)
        _need(cfg.anneal_div >= 1, "anneal_div", "value >= 1 for", cfg.anneal_div)
