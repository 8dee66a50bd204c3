"""The CLI's data as loaders: training, validation and test.

CIFAR-10 and image folders become uint8 tensors on the device (batched augmentation
there); a data plug-in's Datasets go through a plain DataLoader. Validation is a seeded,
class-balanced share of the training images (`val_fraction`), so bounds and epochs are
never chosen on the test split; `val_fraction=0` validates on the test split instead,
and the run says so (param `data.validation`).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from clr_mlflow.data import datasets as data_mod
from clr_mlflow.data import plugins
from clr_mlflow.data.batches import Batches, channel_stats
from clr_mlflow.app.config import Config, ConfigError


@dataclass(frozen=True)
class Loaders:
    train: Iterable       # shuffled (augmented) full batches, for the range test and training
    val: Iterable         # every validation item once, in order
    test: Iterable        # every test item once, in order (evaluated once, after training)
    num_classes: int
    params: dict          # data.* params of the run
    example: torch.Tensor  # two inputs as the model sees them: the logged model's input example


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices): a seeded, class-balanced `fraction` of the
    items held out, the rest kept, both sorted and disjoint."""
    n_val = int(round(len(labels) * fraction))
    # seed + 1: not the same draw that picked a limit_train subset from these labels
    val = data_mod.balanced_subset(labels, n_val, seed + 1) if n_val else np.empty(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), val), val


def _params(described: dict, n_train: int, n_val: int, fraction: float) -> dict:
    where = f"held out from the training images (val_fraction={fraction:g})" if fraction > 0 \
        else "the test split (val_fraction=0)"
    return described | {"data.train_size": n_train, "data.val_size": n_val, "data.validation": where}


def _need_batches(train_size: int, batch_size: int) -> None:
    if train_size < batch_size:
        raise ConfigError(f"Expected batch_size <= the {train_size} training images, but got {batch_size}")


def load_loaders(cfg: Config, device: torch.device, shard: tuple[int, int] = (0, 1)) -> Loaders:
    """`shard`: (rank, world) under torchrun; each rank trains on its part of every batch."""
    if plugins.is_plugin(cfg.data):
        if shard[1] > 1:
            raise ConfigError(f"Expected an image folder or cifar10 as data under torchrun, but got the plug-in "
                              f"{cfg.data} (plug-in data runs in one process)")
        return _plugin_loaders(cfg, device)
    ds = data_mod.load(cfg.data, cfg.data_dir, cfg.limit_train, cfg.limit_test, cfg.image_size, cfg.seed)
    train, val = ds.train, ds.test
    if cfg.val_fraction > 0:
        keep, held = split_validation(ds.train.y, cfg.val_fraction, cfg.seed)
        train, val = data_mod.Split(ds.train.x[keep], ds.train.y[keep]), data_mod.Split(ds.train.x[held],
                                                                                        ds.train.y[held])
    _need_batches(len(train), cfg.batch_size * shard[1])
    mean, std = channel_stats(train)
    eval_batch = max(cfg.batch_size, 512)

    def ordered(split):
        return Batches(split, eval_batch, device, mean, std, False, cfg.seed, channels_last=True, shuffle=False)

    loader = Batches(train, cfg.batch_size, device, mean, std, cfg.augment, cfg.seed, channels_last=True,
                     shard=shard)
    test = ordered(ds.test)
    return Loaders(loader, test if cfg.val_fraction == 0 else ordered(val), test, len(ds.classes),
                   _params(ds.describe(), len(train), len(val), cfg.val_fraction), test.sample(2))


def _plugin_loaders(cfg: Config, device: torch.device) -> Loaders:
    try:
        ds = plugins.load_data(cfg.data)
    except plugins.PluginError as e:
        raise ConfigError(str(e)) from None
    train, val = ds.train, ds.test
    if cfg.val_fraction > 0:
        keep, held = split_validation(plugins.labels(ds.train), cfg.val_fraction, cfg.seed)
        train, val = Subset(ds.train, keep.tolist()), Subset(ds.train, held.tolist())
    _need_batches(len(train), cfg.batch_size)
    pin = device.type == "cuda"

    def ordered(dataset):
        return DataLoader(dataset, max(cfg.batch_size, 512), shuffle=False, collate_fn=plugins.collate,
                          pin_memory=pin)

    loader = DataLoader(train, cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed), collate_fn=plugins.collate, pin_memory=pin)
    test = ordered(ds.test)
    return Loaders(loader, test if cfg.val_fraction == 0 else ordered(val), test, len(ds.classes),
                   _params(ds.describe(), len(train), len(val), cfg.val_fraction),
                   plugins.collate([ds.test[i] for i in range(min(2, len(ds.test)))])[0])
