"""Datasets as uint8 arrays: torchvision's CIFAR-10, or any ImageFolder tree with train/ and test/.

Decoded folders are cached as .npy files keyed by a fingerprint of the folder (every
file's path, size and mtime) and of the selection, so a second run decodes nothing and
an edited folder is decoded again.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 2  # 2: 16-bit greyscale scaled to 8 bits (1 clipped it)


class DataError(ValueError):
    """The data argument points at something that is not a usable dataset."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, H, W, 3) uint8
    y: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    classes: tuple[str, ...]
    source: str
    digest: str  # sha256 of the arrays actually used, first 16 hex digits

    def describe(self) -> dict[str, str | int]:
        return {
            "data.source": self.source,
            "data.train_size": len(self.train),
            "data.test_size": len(self.test),
            "data.num_classes": len(self.classes),
            "data.image_shape": "x".join(map(str, self.train.x.shape[1:])),
            "data.digest": self.digest,
        }


def balanced_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of `limit` items, as even across classes as it can be."""
    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    quota = np.full(len(classes), limit // len(classes))
    quota[: limit % len(classes)] += 1
    # A class with too few items hands its spare quota to the others.
    picked, spare = [], 0
    for idx, q in zip(per_class, quota):
        picked.append(idx[:q])
        spare += max(0, q - len(idx))
    while spare:
        for c, idx in enumerate(per_class):
            if spare and len(picked[c]) < len(idx):
                picked[c] = idx[: len(picked[c]) + 1]
                spare -= 1
    return np.sort(np.concatenate(picked))


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()[:16]


def _take(split: Split, limit: int, seed: int) -> Split:
    idx = balanced_subset(split.y, limit, seed)
    return split if len(idx) == len(split) else Split(split.x[idx], split.y[idx])


def load(
    data: str,
    data_dir: str | os.PathLike = "data",
    limit_train: int = 0,
    limit_test: int = 0,
    image_size: int = 32,
    seed: int = 0,
) -> Dataset:
    """`data` is "cifar10" (torchvision, downloaded into data_dir) or a folder path."""
    if data == "cifar10":
        return _load_torchvision_cifar10(Path(data_dir), limit_train, limit_test, image_size, seed)
    return _load_folder(Path(data), Path(data_dir), limit_train, limit_test, image_size, seed)


def _load_torchvision_cifar10(data_dir, limit_train, limit_test, image_size, seed) -> Dataset:
    from torchvision.datasets import CIFAR10

    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(root=str(data_dir), train=train, download=True)
        except (OSError, RuntimeError) as e:  # offline: URLError is an OSError
            raise DataError(f"Expected data=cifar10 to download into {data_dir}, but it failed ({type(e).__name__}: "
                            f"{str(e)[:120]}): work online, or pass data=FOLDER with train/ and test/") from None
        classes = tuple(ds.classes)
        split = _take(Split(ds.data, np.asarray(ds.targets, dtype=np.int64)), limit_train if train else limit_test, seed)
        if image_size != split.x.shape[1]:
            split = Split(_resize_all(split.x, image_size), split.y)
        splits.append(split)
    return Dataset(splits[0], splits[1], classes, "torchvision:CIFAR10", _digest(*(a for s in splits for a in (s.x, s.y))))


def _scan(split_dir: Path) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """Classes and (path, label, size, mtime_ns) for every image of one split folder."""
    if not split_dir.is_dir():
        raise DataError(f"Expected data folder with a {split_dir.name}/ subfolder, but {split_dir} does not exist")
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir())
    if not classes:
        raise DataError(f"Expected one subfolder per class in {split_dir}, but found none")
    files = []
    for label, name in enumerate(classes):
        entries = sorted(
            (e for e in os.scandir(split_dir / name) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)),
            key=lambda e: e.name,
        )
        if not entries:
            raise DataError(f"Expected images in class folder {split_dir / name}, but it has none")
        for e in entries:
            st = e.stat()
            files.append((e.path, label, st.st_size, st.st_mtime_ns))
    return classes, files


def _to_rgb(im):
    """An opened image as 8-bit RGB. PIL's convert("RGB") clips wider modes instead of
    scaling them, so a 16-bit greyscale PNG (mode I;16, values up to 65535) would come out
    nearly all white: 16-bit and 32-bit integer greyscale (I;16*, I) is scaled from the
    16-bit range, v / 257 rounded (0 -> 0, 65535 -> 255), and float greyscale (F) is
    rounded and clipped to 0-255. Everything else goes through convert("RGB") as in
    torchvision's loader: L is repeated into three channels, P takes its palette colours,
    RGBA/LA drop alpha (the stored colours are kept, not blended with a background)."""
    from PIL import Image

    if im.mode == "I" or im.mode.startswith("I;16"):
        grey = np.clip(np.rint(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "F":
        grey = np.clip(np.rint(np.nan_to_num(np.asarray(im, dtype=np.float64))), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")


def _decode_one(path: str, image_size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = _to_rgb(im)
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"Cannot read image {path}: {e}") from None


def _decode(paths: list[str], image_size: int) -> np.ndarray:
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    # PIL releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, arr in enumerate(pool.map(lambda p: _decode_one(p, image_size), paths, chunksize=256)):
            out[i] = arr
    return out


def _resize_all(x: np.ndarray, image_size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(a).resize((image_size, image_size), Image.BILINEAR)) for a in x])


def _load_folder(root, data_dir, limit_train, limit_test, image_size, seed) -> Dataset:
    if not root.exists():
        raise DataError(f"Expected data to be 'cifar10' or an existing folder, but {root} does not exist")
    if not root.is_dir():
        raise DataError(f"Expected data to be a folder with train/ and test/, but {root} is a file")
    (train_classes, train_files), (test_classes, test_files) = _scan(root / "train"), _scan(root / "test")
    if train_classes != test_classes:
        only = sorted(set(train_classes) ^ set(test_classes))
        raise DataError(f"Expected the same classes in train/ and test/ of {root}, but they differ in: {', '.join(only)}")

    key = hashlib.sha256(
        json.dumps([CACHE_VERSION, image_size, limit_train, limit_test, seed, train_files, test_files]).encode()
    ).hexdigest()[:20]
    cache = data_dir / "cache" / f"{root.name}-{key}"
    splits = _read_cache(cache)
    if splits is None:
        splits = []
        for files, limit in ((train_files, limit_train), (test_files, limit_test)):
            labels = np.array([f[1] for f in files], dtype=np.int64)
            idx = balanced_subset(labels, limit, seed)
            splits.append(Split(_decode([files[i][0] for i in idx], image_size), labels[idx]))
        _write_cache(cache, splits)
    digest = _digest(*(a for s in splits for a in (s.x, s.y)))
    return Dataset(splits[0], splits[1], tuple(train_classes), str(root.resolve()), digest)


def _read_cache(cache: Path) -> list[Split] | None:
    try:
        return [Split(np.load(cache / f"{s}_x.npy"), np.load(cache / f"{s}_y.npy")) for s in ("train", "test")]
    except (OSError, ValueError):
        return None


def _write_cache(cache: Path, splits: list[Split]) -> None:
    # Written to a temporary folder and renamed, so parallel runs never read half a cache.
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, s in zip(("train", "test"), splits):
            np.save(tmp / f"{name}_x.npy", s.x)
            np.save(tmp / f"{name}_y.npy", s.y)
        tmp.rename(cache)
    except OSError:
        pass  # another run won the race, or the disk is read-only: the data is in memory anyway
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
