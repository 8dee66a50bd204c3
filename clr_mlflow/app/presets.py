"""Named settings from the literature. A preset fills in every parameter still at its
default; a parameter given a non-default value wins over the preset."""
from __future__ import annotations

from dataclasses import fields, replace

from torch import nn

from clr_mlflow.app.config import Config, ConfigError

# Smith (2017), "Cyclical Learning Rates for Training Neural Networks", section 4.1.1 and
# Table 1: Caffe's CIFAR-10 "full" network, batch 100 (500 iterations an epoch), step size
# 2000, bounds 0.001-0.006, exp_range gamma 0.99994. Caffe's solver: momentum 0.9, weight
# decay 0.004, no augmentation (mean subtraction only).
SMITH2017_CIFAR10 = dict(
    model="smith_cifar", batch_size=100, base_lr=0.001, max_lr=0.006, step_size=2000, gamma=0.99994,
    momentum=0.9, nesterov=False, weight_decay=0.004, augment=False,
)
# Table 1's iteration counts (its accuracies, to hold results against: fixed 81.4% at 70k,
# triangular2 81.4% at 25k, exp_range 82.2% at 42k; one_cycle is ours, not in the table).
SMITH2017_ITERATIONS = {"fixed": 70_000, "triangular": 25_000, "triangular2": 25_000, "exp_range": 42_000,
                        "one_cycle": 25_000}

PRESETS = {"smith2017_cifar10": (SMITH2017_CIFAR10, SMITH2017_ITERATIONS)}


def apply_preset(cfg: Config) -> tuple[Config, dict]:
    """The config with the preset's values where cfg still has the default, and a dict of
    the values the preset changed."""
    if not cfg.preset:
        return cfg, {}
    if cfg.preset not in PRESETS:
        raise ConfigError(f"Expected preset to be one of {', '.join(PRESETS)} or empty, but got {cfg.preset!r}")
    values, iterations = PRESETS[cfg.preset]
    defaults = {f.name: f.default for f in fields(Config)}
    changed = {k: v for k, v in values.items() if getattr(cfg, k) == defaults[k] and v != defaults[k]
               and not (cfg.bounds_from and k in ("base_lr", "max_lr"))}  # bounds_from brings its own bounds
    if cfg.iterations == 0 and cfg.epochs == 0 and cfg.cycles == defaults["cycles"] and cfg.policy in iterations:
        changed["iterations"] = iterations[cfg.policy]
    return replace(cfg, **changed), changed


# Caffe's cifar10_full_train_test.prototxt sets per-parameter multipliers the solver's
# single lr and weight decay do not show: every bias learns at 2x the lr (lr_mult: 2)
# without weight decay (decay_mult: 0), and the classifier's weights decay 250x harder
# (decay_mult: 250, so 250 x 0.004 = 1.0). Conv weights keep 1x and 0.004.
BIAS_LR_MULT, CLASSIFIER_DECAY_MULT = 2.0, 250.0


def param_groups(cfg: Config, model: nn.Module) -> list[dict] | None:
    """The preset's per-parameter groups as `{"params", "lr_mult", "weight_decay"}` (None
    without a preset that has them): weights, the classifier's weight (the last Linear),
    and biases."""
    if cfg.preset != "smith2017_cifar10":
        return None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classifier = linears[-1].weight if linears else None
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p is classifier:
            continue
        (biases if name.endswith("bias") else weights).append(p)
    groups = [{"params": weights, "lr_mult": 1.0, "weight_decay": cfg.weight_decay},
              {"params": biases, "lr_mult": BIAS_LR_MULT, "weight_decay": 0.0}]
    if classifier is not None:
        groups.insert(1, {"params": [classifier], "lr_mult": 1.0,
                          "weight_decay": cfg.weight_decay * CLASSIFIER_DECAY_MULT})
    return [g for g in groups if g["params"]]
