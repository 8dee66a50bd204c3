"""The paper's preset is the paper's: Caffe's per-parameter lr and decay multipliers."""
import pytest
import torch

import clr_mlflow
from clr_mlflow.app.config import Config
from clr_mlflow.core.engine import make_optimizer
from clr_mlflow.data.models import build_model
from clr_mlflow.app.presets import apply_preset, param_groups


def test_smith2017_groups_follow_caffes_cifar10_full_prototxt():
    cfg, _ = apply_preset(Config(preset="smith2017_cifar10", policy="triangular"))
    model = build_model(cfg.model, 10)
    opt = make_optimizer(model, cfg.optimizer, cfg.base_lr, cfg.momentum, cfg.nesterov, cfg.weight_decay,
                         param_groups(cfg, model))
    weights, classifier, biases = opt.param_groups
    conv_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    all_biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert {id(p) for p in weights["params"]} == {id(p) for p in conv_weights}
    assert classifier["params"] == [model[-1].weight]
    assert {id(p) for p in biases["params"]} == {id(p) for p in all_biases} and len(all_biases) == 4
    assert (weights["weight_decay"], classifier["weight_decay"], biases["weight_decay"]) == \
        pytest.approx((0.004, 1.0, 0.0))
    assert (weights["lr"], classifier["lr"], biases["lr"]) == pytest.approx((0.001, 0.001, 0.002))
    # the cyclical schedule keeps every bias at 2x the lr, all along
    sched = clr_mlflow.clr_scheduler(opt, "triangular", 0.001, 0.006, step_size=5)
    for _ in range(12):
        lrs = sched.get_last_lr()
        assert lrs[2] == pytest.approx(2 * lrs[0]) and lrs[1] == pytest.approx(lrs[0])
        opt.step()
        sched.step()


def test_without_a_preset_there_is_one_group():
    cfg = Config()
    model = build_model(cfg.model, 10)
    assert param_groups(cfg, model) is None
    assert len(make_optimizer(model, "sgd", 0.1, 0.9, True, 5e-4).param_groups) == 1


def test_a_preset_leaves_the_bounds_to_bounds_from():
    cfg, changed = apply_preset(Config(preset="smith2017_cifar10", bounds_from="0" * 32))
    assert "max_lr" not in changed and cfg.max_lr == 0 and cfg.model == "smith_cifar"


def test_a_range_test_with_a_preset_always_tests(tracking, cifar, data_dir):
    """The preset's max_lr counts as given bounds for training, but range-test never skips its test."""
    from clr_mlflow.app.runner import execute

    cfg = Config(preset="smith2017_cifar10", data=str(cifar), data_dir=str(data_dir), limit_train=1200,
                 limit_test=100, batch_size=50, num_iters=20, lr_start=1e-4, lr_end=1.0, device="cpu",
                 experiment="preset_rt")
    out = execute(cfg, "range-test")
    assert out.range_test is not None and len(out.range_test.lrs) >= 10
    from mlflow import MlflowClient

    assert len(MlflowClient().get_metric_history(out.run_id, "range_test/lr")) == len(out.range_test.lrs)
