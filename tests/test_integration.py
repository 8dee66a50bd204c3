"""Range test and training on real CIFAR-10 images, tracked into a real SQLite store and
read back with MlflowClient."""
import io
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from clr_mlflow.core.bounds import RULES
from clr_mlflow.app.config import Config, ConfigError
from clr_mlflow.core.curve import smooth
from clr_mlflow.app.runner import execute
from clr_mlflow.core.schedules import make_schedule
from tests.conftest import use_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    yield use_store(mp, tmp_path_factory.mktemp("store"))
    mlflow.set_tracking_uri(None)
    mp.undo()


@pytest.fixture(scope="module")
def base(cifar, data_dir):
    return dict(data=str(cifar), data_dir=str(data_dir), batch_size=64, seed=0, device="cpu")


def history(run_id, key):
    h = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)
    return np.array([m.step for m in h]), np.array([m.value for m in h])


def artifact_bytes(run_id, path):
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    with open(local, "rb") as f:
        return f.read()


def assert_png(raw: bytes):
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(raw))
    img.verify()
    assert img.size[0] > 300 and img.size[1] > 200


@pytest.fixture(scope="module")
def range_run(store, base):
    cfg = Config(**base, limit_train=2000, limit_test=200, num_iters=80, lr_start=1e-4, lr_end=10.0,
                 eval_every=10, experiment="it_range", bounds_rule="steepest")
    return cfg, execute(cfg, "range-test")


def test_range_test_histories_read_back_from_mlflow(range_run):
    cfg, out = range_run
    n = len(out.range_test.lrs)
    assert 20 < n <= 80
    steps, lrs = history(out.run_id, "range_test/lr")
    np.testing.assert_array_equal(steps, np.arange(n))
    np.testing.assert_allclose(lrs, np.geomspace(1e-4, 10.0, 80)[:n], rtol=1e-12)
    _, raw = history(out.run_id, "range_test/loss")
    _, smoothed = history(out.run_id, "range_test/smoothed_loss")
    np.testing.assert_allclose(smoothed, smooth(raw, 0.98), rtol=1e-12)
    acc_steps, acc = history(out.run_id, "range_test/accuracy")
    assert list(acc_steps) == [s for s in range(9, n, 10)]
    assert np.all((0 <= acc) & (acc <= 1))
    assert len(history(out.run_id, "range_test/val_loss")[0]) == len(acc_steps)


def test_range_test_params_tags_and_chosen_bounds(range_run):
    cfg, out = range_run
    run = MlflowClient().get_run(out.run_id)
    p = run.data.params
    assert p["lr_end"] == "10.0" and p["bounds_rule"] == "steepest" and p["eval_every"] == "10"
    assert p["data.train_size"] == "1800" and p["data.val_size"] == "200" and p["data.test_size"] == "200"
    assert len(p["data.digest"]) == 16 and p["data.validation"].startswith("held out from the training images")
    assert "policy" not in p  # a range test alone logs only what it used
    assert run.data.tags["bounds_rule"] == "steepest" and run.data.tags["clr_mlflow.device"] == "cpu"
    base_lr, max_lr, _ = out.bounds
    assert run.data.metrics["bounds/base_lr"] == pytest.approx(base_lr)
    assert run.data.metrics["bounds/max_lr"] == pytest.approx(max_lr) == pytest.approx(4 * base_lr)
    assert run.data.metrics["time/range_test_seconds"] == pytest.approx(out.range_test_seconds)


def test_bounds_table_through_load_table_and_artifacts(range_run):
    cfg, out = range_run
    mlflow.set_experiment("it_range")
    table = mlflow.load_table("range_test/bounds.json", extra_columns=["run_id"])
    assert list(table["rule"]) == list(RULES)
    assert set(table["run_id"]) == {out.run_id}
    chosen = table[table["selected"]]
    assert list(chosen["rule"]) == ["steepest"] and chosen["max_lr"].iloc[0] == pytest.approx(out.bounds[1])
    assert_png(artifact_bytes(out.run_id, "range_test/curve.png"))
    curve = pd.read_csv(io.BytesIO(artifact_bytes(out.run_id, "range_test/curve.csv")))
    assert len(curve) == len(out.range_test.lrs)
    np.testing.assert_allclose(curve["smoothed_loss"], out.range_test.smoothed)


def test_training_history_equals_the_schedule_and_epoch_metrics_line_up(store, base):
    cfg = Config(**base, limit_train=320, limit_test=100, policy="triangular2", base_lr=0.01, max_lr=0.1,
                 step_size=3, cycles=2, experiment="it_train")  # 288 after validation: 4 iterations an epoch
    out = execute(cfg, "run")
    assert out.range_test is None  # bounds given: no range test
    steps, lrs = history(out.run_id, "train/lr")
    expected = make_schedule("triangular2", 0.01, 0.1, 3, 12).lrs(12)
    np.testing.assert_array_equal(steps, np.arange(12))
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    _, raw = history(out.run_id, "train/loss")
    np.testing.assert_allclose(history(out.run_id, "train/smoothed_loss")[1], smooth(raw, 0.98), rtol=1e-12)
    for key in ("val/accuracy", "val/loss", "train/epoch_loss", "train/epoch_accuracy"):
        assert list(history(out.run_id, key)[0]) == [3, 7, 11], key
    run = MlflowClient().get_run(out.run_id)
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    assert out.loaders.test.passes == 1 and out.loaders.val.passes == 3  # test once; validation every epoch
    assert m["test/accuracy"] == out.test_accuracy and "test/best_accuracy" not in m
    assert m["val/best_accuracy"] == max(history(out.run_id, "val/accuracy")[1])
    assert m["time/train_seconds"] > 0 and "time/range_test_seconds" not in m  # no range test ran
    assert p["bounds_source"] == "given" and p["effective.step_size"] == "3" and p["total_iters"] == "12"
    assert t["policy"] == "triangular2" and t["bounds_rule"] == "given"
    arts = {a.path for a in MlflowClient().list_artifacts(out.run_id, "train")}
    assert {"train/schedule.png", "train/curves.png", "train/epochs.csv"} <= arts
    assert_png(artifact_bytes(out.run_id, "train/schedule.png"))
    # the Logged Model loads and predicts what the trained network predicts
    import mlflow.pytorch
    import torch

    logged = mlflow.pytorch.load_model(f"runs:/{out.run_id}/model").eval()
    x = out.loaders.example
    with torch.no_grad():
        scores = logged(x).numpy()
    assert scores.shape == (2, 10) and np.isfinite(scores).all() and "0.0.weight" in logged.state_dict()
    served = mlflow.pyfunc.load_model(f"runs:/{out.run_id}/model").predict(x.numpy())
    np.testing.assert_allclose(served, scores, rtol=1e-5, atol=1e-6)
    # the datasets it saw, with the digest reproduce compares
    inputs = {i.tags[0].value if i.tags else "": i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    assert {d.digest for d in inputs.values()} == {p["data.digest"]}
    # a description a person can read
    note = t["mlflow.note.content"]
    assert "Training: triangular2, 12 iterations" in note and "Bounds: base_lr 0.01, max_lr 0.1 (given)" in note


def test_bounds_from_an_earlier_range_test(range_run, base):
    _, earlier = range_run
    cfg = Config(**base, limit_train=320, limit_test=100, policy="exp_range", bounds_from=earlier.run_id,
                 epochs=1, save_model=False, experiment="it_train")
    out = execute(cfg, "train")
    assert out.bounds[:2] == pytest.approx(earlier.bounds[:2])
    run = MlflowClient().get_run(out.run_id)
    assert run.data.params["bounds_source"] == f"run:{earlier.run_id}"
    assert run.data.metrics["bounds/max_lr"] == pytest.approx(earlier.bounds[1])
    assert not MlflowClient().get_run(out.run_id).outputs or not MlflowClient().get_run(out.run_id).outputs.model_outputs


@pytest.mark.parametrize("change,message", [
    (dict(policy="cosine"), "policy"),
    (dict(base_lr=0.1, max_lr=0.01), "max_lr"),
    (dict(base_lr=-1.0), "base_lr"),
    (dict(step_size=-2), "step_size"),
    (dict(gamma=1.5), "gamma"),
    (dict(gamma=0.0), "gamma"),
    (dict(cycles=0, epochs=0), "cycles, epochs or iterations"),
    (dict(bounds_from="0123456789abcdef0123456789abcdef"), "existing run"),
    (dict(model="vgg"), "small_cnn, resnet18"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_input_fails_before_any_run_is_created(store, base, change, message):
    cfg = Config(**(base | {"limit_train": 200, "experiment": "it_bad"} | change))
    with pytest.raises(ConfigError, match=message):
        execute(cfg, "run")
    exp = mlflow.get_experiment_by_name("it_bad")
    assert exp is None or mlflow.search_runs([exp.experiment_id]).empty


def test_bounds_from_a_run_without_a_table_is_refused(store, base):
    with mlflow.start_run() as plain:
        pass
    cfg = Config(**base, limit_train=200, bounds_from=plain.info.run_id)
    with pytest.raises(ConfigError, match="has none"):
        execute(cfg, "train")


def test_nan_free_numbers_in_the_summary(range_run):
    cfg, out = range_run
    assert out.run_id in out.summary() and not math.isnan(out.bounds[0])


def test_a_diverging_training_keeps_everything_up_to_the_failure(store, base):
    from clr_mlflow.core.training import TrainingDiverged

    cfg = Config(**base, limit_train=320, limit_test=100, policy="fixed", base_lr=5e5, max_lr=1e6, iterations=40,
                 experiment="it_fail")
    with pytest.raises(TrainingDiverged, match="not finite") as failure:
        execute(cfg, "train")
    run = mlflow.search_runs(experiment_names=["it_fail"]).iloc[0]
    assert run["status"] == "FAILED"
    steps, raw = history(run["run_id"], "train/loss")
    assert len(steps) >= 1 and list(steps) == list(range(len(steps)))
    first_bad = int(np.flatnonzero(~np.isfinite(raw))[0])
    assert f"at iteration {first_bad}:" in str(failure.value)
    assert len(history(run["run_id"], "train/lr")[0]) == len(steps)


def test_validation_split_is_disjoint_class_balanced_and_seeded(cifar, data_dir):
    from clr_mlflow.data import datasets as data
    from clr_mlflow.app.loaders import split_validation

    ds = data.load(str(cifar), data_dir, limit_train=1000, limit_test=100, seed=0)
    keep, val = split_validation(ds.train.y, 0.1, seed=0)
    assert len(val) == 100 and len(keep) == 900 and not set(keep) & set(val)
    assert sorted(set(keep) | set(val)) == list(range(1000))
    assert np.bincount(ds.train.y[val], minlength=10).tolist() == [10] * 10
    again, other = split_validation(ds.train.y, 0.1, seed=0)[1], split_validation(ds.train.y, 0.1, seed=1)[1]
    assert np.array_equal(val, again) and not np.array_equal(val, other)
    # no validation image is a training image, pixel for pixel
    train_rows = {bytes(x) for x in ds.train.x[keep]}
    assert not any(bytes(x) in train_rows for x in ds.train.x[val])


def test_val_fraction_zero_validates_on_the_test_split_and_says_so(store, base):
    cfg = Config(**base, limit_train=320, limit_test=100, val_fraction=0.0, policy="fixed", base_lr=0.01, max_lr=0.02,
                 iterations=5, save_model=False, experiment="it_val0")
    out = execute(cfg, "train")
    assert out.loaders.val is out.loaders.test
    p = MlflowClient().get_run(out.run_id).data.params
    assert p["data.validation"] == "the test split (val_fraction=0)" and p["data.val_size"] == "100"
