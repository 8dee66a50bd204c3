"""The engine on real CIFAR-10 images, without MLflow: batches, range test, state restore."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from clr_mlflow.data import datasets as data
from clr_mlflow.data.batches import Batches, channel_stats, crop_flip
from clr_mlflow.core.curve import DivergenceRule, sweep_lrs
from clr_mlflow.core.engine import make_optimizer, seed_everything
from clr_mlflow.data.models import build_model, resnet18_cifar
from clr_mlflow.core.range_test import range_test
from clr_mlflow.core.steps import CrossEntropy, Stepper, classification_eval


def rt(model, opt, batches, lrs, **kw):
    return range_test(Stepper(model, opt, CrossEntropy(), torch.device("cpu")), batches, lrs, progress=False, **kw)


@pytest.fixture(scope="module")
def small(cifar, tmp_path_factory):
    # 16-px images: the loop's behaviour is the point, not the pictures (4x less compute a step)
    return data.load(str(cifar), tmp_path_factory.mktemp("d"), limit_train=640, limit_test=100, image_size=16,
                     seed=0)


def make_batches(ds, augment=True, seed=0, batch_size=64):
    mean, std = channel_stats(ds.train)
    return Batches(ds.train, batch_size, torch.device("cpu"), mean, std, augment, seed)


def test_batch_crop_flip_equals_torchvision_per_image_for_the_same_draws():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy, dx = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    got = crop_flip(x, dy, dx, flip)
    for i in range(16):
        ref = TF.crop(TF.pad(x[i], [4]), int(dy[i]), int(dx[i]), 32, 32)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert torch.equal(got[i], ref), i


def test_epoch_is_a_permutation_of_full_batches(small):
    b = make_batches(small, augment=False)
    ys = torch.cat([y for _, y in b.epoch()])
    assert len(b) == 10 and len(ys) == 640
    assert sorted(ys.tolist()) == sorted(small.train.y.tolist())
    x = torch.cat([x for x, _ in b.ordered()])
    assert x.dtype == torch.float32 and x.shape == (640, 3, 16, 16)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def run_small_test(ds, sync_every=8, n=40, lr_end=1.0):
    seed_everything(0)
    model = build_model("small_cnn", 10)
    opt = make_optimizer(model, "sgd", 1e-4, 0.9, True, 5e-4)
    return rt(model, opt, make_batches(ds), sweep_lrs(1e-4, lr_end, n), sync_every=sync_every)


def test_range_test_is_bit_identical_for_the_same_seed_and_any_sync_interval(small):
    a = run_small_test(small, sync_every=8)
    b = run_small_test(small, sync_every=8)
    c = run_small_test(small, sync_every=1)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.losses, c.losses)
    np.testing.assert_array_equal(a.smoothed, c.smoothed)
    assert len(a.lrs) == 40 and a.lrs[0] == 1e-4 and a.lrs[-1] == 1.0


def test_range_test_stops_on_divergence_and_cuts_the_curve_at_the_trigger(small):
    seed_everything(0)
    res8 = run_small_test(small, sync_every=8, n=120, lr_end=1e4)
    res1 = run_small_test(small, sync_every=1, n=120, lr_end=1e4)
    assert len(res8.lrs) < 120 and ("diverged" in res8.stop_reason or "not finite" in res8.stop_reason)
    assert res8.stop_reason == res1.stop_reason
    np.testing.assert_array_equal(res8.losses, res1.losses)
    # the curve ends at the first step the stop rule (curve.DivergenceRule, in the loss's own
    # units) trips: the rule run afresh over the kept curve trips there and nowhere before
    rule = DivergenceRule(4.0, 0.98)
    assert rule.first_stop(res8.losses, res8.smoothed) == len(res8.lrs) - 1


def test_model_optimizer_and_rng_are_restored_bit_identically(small):
    seed_everything(1)
    model = build_model("small_cnn", 10)
    opt = make_optimizer(model, "sgd", 0.01, 0.9, True, 5e-4)
    batches = make_batches(small)
    # give the optimizer some momentum state to restore
    x, y = next(batches.epoch())
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    rng, data_rng = torch.get_rng_state(), batches.generator.get_state()
    rt(model, opt, batches, sweep_lrs(1e-3, 10, 30))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], momentum[k])
    assert opt.param_groups[0]["lr"] == 0.01
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(batches.generator.get_state(), data_rng)


def test_state_is_restored_when_the_loop_raises(small):
    model = build_model("small_cnn", 10)
    opt = make_optimizer(model, "sgd", 0.01, 0.9, True, 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Boom:
        def series(self, steps, values):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rt(model, opt, make_batches(small), sweep_lrs(1e-3, 1, 20), sink=Boom())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "smith_cifar", "fast"])
def test_every_model_maps_images_to_class_scores(name):
    assert build_model(name, 7)(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert build_model(name, 7, image_size=40)(torch.zeros(2, 3, 40, 40)).shape == (2, 7)


def test_resnet18_cifar_keeps_resolution_in_the_stem():
    m = resnet18_cifar(10)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="small_cnn"):
        build_model("vgg", 10)


class Recorder:
    """A sink that keeps everything it is sent, to compare what two loops report."""

    def __init__(self):
        self.sent = {}

    def series(self, steps, values):
        for k, v in values.items():
            self.sent.setdefault(k, []).extend(zip(np.asarray(steps).tolist(), np.asarray(v).tolist()))

    points = series


def test_chunked_host_transfer_reports_the_same_values_as_per_iteration(small):
    from clr_mlflow.core.schedules import ScheduleLR, make_schedule
    from clr_mlflow.core.training import train

    sent = []
    for sync in (1, 7):
        seed_everything(0)
        model = build_model("small_cnn", 10)
        opt = make_optimizer(model, "sgd", 0.01, 0.9, True, 5e-4)
        rec_rt, tr = Recorder(), Recorder()
        rt(model, opt, make_batches(small), sweep_lrs(1e-4, 1.0, 30), sink=rec_rt, sync_every=sync)
        held = make_batches(small, augment=False)
        sched = ScheduleLR(opt, make_schedule("triangular", 0.01, 0.1, 4, 16))
        stepper = Stepper(model, opt, CrossEntropy(), torch.device("cpu"))
        train(stepper, sched, make_batches(small), 16, val_loader=held, evaluator=classification_eval(stepper.device),
              sink=tr, sync_every=sync, progress=False)
        sent.append((rec_rt.sent, tr.sent))
    assert sent[0] == sent[1]
    assert [s for s, _ in sent[0][1]["train/lr"]] == list(range(16))
