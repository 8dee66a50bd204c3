import pickle

import numpy as np
import pytest

from clr_mlflow import data
from clr_mlflow.data import DataError, balanced_subset
from tests.conftest import make_image_folder


def test_balanced_subset_is_even_seeded_and_sorted():
    labels = np.repeat(np.arange(10), 100)
    idx = balanced_subset(labels, 205, seed=3)
    counts = np.bincount(labels[idx], minlength=10)
    assert len(idx) == 205 and counts.max() - counts.min() <= 1
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, balanced_subset(labels, 205, seed=3))
    assert not np.array_equal(idx, balanced_subset(labels, 205, seed=4))


def test_balanced_subset_hands_spare_quota_of_a_small_class_to_others():
    labels = np.array([0] * 2 + [1] * 50 + [2] * 50)
    idx = balanced_subset(labels, 30, seed=0)
    assert len(idx) == 30 and np.bincount(labels[idx]).tolist() == [2, 14, 14]


def test_folder_loads_resizes_and_caches(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "imgs", size=12)
    ds = data.load(str(root), tmp_path / "cache", image_size=16)
    assert ds.classes == ("a", "b", "c")
    assert ds.train.x.shape == (18, 16, 16, 3) and ds.train.x.dtype == np.uint8
    assert ds.test.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the folder did not change")

    monkeypatch.setattr(data, "_decode", no_decoding)
    again = data.load(str(root), tmp_path / "cache", image_size=16)
    assert again.digest == ds.digest
    np.testing.assert_array_equal(again.train.x, ds.train.x)

    # a changed folder is noticed: the cache misses and decodes again
    make_image_folder(tmp_path / "imgs", per_class=(7, 3), size=12, seed=1)
    with pytest.raises(AssertionError, match="decoded again"):
        data.load(str(root), tmp_path / "cache", image_size=16)


@pytest.mark.parametrize("breakage,message", [
    (lambda r: r / "nowhere", "does not exist"),
    (lambda r: (r / "file.txt").write_text("x") and r / "file.txt", "is a file"),
    (lambda r: (__import__("shutil").rmtree(r / "train"), r)[1], "train/"),
    (lambda r: ([p.unlink() for p in (r / "test" / "b").iterdir()], r)[1], "has none"),
    (lambda r: ((r / "train" / "a" / "000.png").write_bytes(b"not an image"), r)[1], "Cannot read image"),
    (lambda r: ((r / "test" / "a").rename(r / "test" / "d"), r)[1], "differ in: a, d"),
])
def test_bad_folders_give_a_clear_error(tmp_path, breakage, message):
    root = breakage(make_image_folder(tmp_path / "imgs"))
    with pytest.raises(DataError, match=message):
        data.load(str(root), tmp_path / "cache")


def test_shared_cifar10_subset(cifar, data_dir):
    ds = data.load(str(cifar), data_dir, limit_train=200, limit_test=50, seed=0)
    assert ds.classes[:3] == ("airplane", "automobile", "bird") and len(ds.classes) == 10
    assert np.bincount(ds.train.y).tolist() == [20] * 10
    assert ds.train.x.shape == (200, 32, 32, 3) and len(ds.test) == 50
    assert ds.describe()["data.digest"] == ds.digest


def test_torchvision_cifar10_path_reads_the_official_format(tmp_path, cifar, data_dir, monkeypatch):
    """Offline there is no download, so write the official python batches (from the shared
    JPEGs) where torchvision looks; only its md5 check is bypassed, since ours differ."""
    from torchvision.datasets import CIFAR10

    src = data.load(str(cifar), data_dir, limit_train=100, limit_test=20)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for i, name in enumerate(names):
        part = slice(i * 20, (i + 1) * 20)
        batch = {"data": src.train.x[part].transpose(0, 3, 1, 2).reshape(20, -1), "labels": src.train.y[part].tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    test = {"data": src.test.x.transpose(0, 3, 1, 2).reshape(20, -1), "labels": src.test.y.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(src.classes)}))
    import torchvision.datasets.cifar

    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)

    ds = data.load("cifar10", tmp_path, limit_train=50)
    assert ds.source == "torchvision:CIFAR10" and ds.classes == src.classes
    assert len(ds.train) == 50 and len(ds.test) == 20
    np.testing.assert_array_equal(ds.test.x, src.test.x)
