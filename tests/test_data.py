import pickle

import numpy as np
import pytest

from clr_mlflow.data import datasets as data
from clr_mlflow.data.datasets import DataError, balanced_subset
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


def test_every_image_mode_decodes_to_its_8_bit_rgb_values(tmp_path):
    """Issue 13: a 16-bit greyscale PNG decoded nearly all white (convert("RGB") clips)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    wide = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    wide[0, :4] = [0, 257, 65535, 128]  # exact steps and a value that rounds down to 0
    palette = np.array([[255, 0, 0], [0, 128, 255], [17, 34, 51], [250, 250, 250]], dtype=np.uint8)
    index = rng.integers(0, 4, (8, 8), dtype=np.uint8)
    p_image = Image.fromarray(index, "P")
    p_image.putpalette(palette.ravel().tolist())
    images = {
        "0_rgba.png": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb),  # alpha dropped, colours kept
        "1_l.png": (Image.fromarray(grey, "L"), np.repeat(grey[..., None], 3, axis=2)),
        "2_i16.png": (Image.fromarray(wide), np.repeat(np.rint(wide / 257).astype(np.uint8)[..., None], 3, axis=2)),
        "3_p.png": (p_image, palette[index]),
    }
    for split in ("train", "test"):
        (tmp_path / "imgs" / split / "x").mkdir(parents=True)
        for name, (im, _) in images.items():
            im.save(tmp_path / "imgs" / split / "x" / name)
    assert Image.open(tmp_path / "imgs" / "train" / "x" / "2_i16.png").mode == "I;16"
    assert Image.open(tmp_path / "imgs" / "train" / "x" / "3_p.png").mode == "P"
    ds = data.load(str(tmp_path / "imgs"), tmp_path / "cache", image_size=8)
    assert ds.train.x.dtype == np.uint8 and ds.train.x.shape == (4, 8, 8, 3)
    for i, (name, (_, expected)) in enumerate(images.items()):
        np.testing.assert_array_equal(ds.train.x[i], expected, err_msg=name)
        np.testing.assert_array_equal(ds.test.x[i], expected, err_msg=name)
    assert ds.train.x[2, 0, :4, 0].tolist() == [0, 1, 255, 0]
    assert ds.train.x[2].mean() < 200  # not the near-white of clipping


def test_wide_greyscale_modes_scale_from_16_bits():
    from PIL import Image

    from clr_mlflow.data.datasets import _to_rgb

    big_endian = Image.frombytes("I;16B", (3, 1), np.array([0, 32896, 65535], dtype=">u2").tobytes())
    assert _to_rgb(big_endian).getpixel((1, 0)) == (128, 128, 128)
    as_int = Image.fromarray(np.array([[0, 514, 70000]], dtype=np.int32), "I")
    assert [_to_rgb(as_int).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (2, 2, 2), (255, 255, 255)]
    as_float = Image.fromarray(np.array([[-3.0, 99.6, 300.0]], dtype=np.float32), "F")
    assert [_to_rgb(as_float).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
