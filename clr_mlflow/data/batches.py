"""Batches straight from uint8 tensors on the compute device: shuffle, random crop, flip
and normalise a whole batch at once — no DataLoader workers, no PIL per image.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from clr_mlflow.data.datasets import Split

PAD = 4  # CIFAR's standard augmentation: random crop of the image padded by 4, and a flip


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Per-sample crop at offsets (dy, dx) of the zero-padded batch, then a horizontal flip
    where `flip` is true. x: (B, C, H, W); dy, dx in [0, 2*pad]; one gather for the batch."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


class Batches:
    """A split held on `device` as uint8 (N, C, H, W), served as normalised float `(x, y)`
    batches: a loader like any other for the loops. Iterating gives one shuffled epoch of
    full batches (`shuffle=True`, for training) or every item once in order (for evaluation)."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, mean: torch.Tensor, std: torch.Tensor,
                 augment: bool, seed: int, channels_last: bool = False, shuffle: bool = True,
                 shard: tuple[int, int] = (0, 1)):
        self.x = torch.from_numpy(split.x).permute(0, 3, 1, 2).contiguous().to(device)
        self.y = torch.from_numpy(split.y).to(device)
        self.batch_size = batch_size
        self.device = device
        self.mean = mean.to(device).view(1, -1, 1, 1)
        self.std = std.to(device).view(1, -1, 1, 1)
        self.augment = augment
        self.shuffle = shuffle
        # (rank, world): under torchrun every rank draws the same order (same seed) and keeps
        # every world-th item of each global batch of world x batch_size.
        self.rank, self.world = shard
        self.passes = 0  # times iterated: how often a split was looked at (the test split: once)
        self.channels_last = channels_last
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self) -> int:
        """Batches per pass: full batches when shuffled (the last partial batch is dropped,
        as BatchNorm prefers), every item when ordered."""
        if self.shuffle:
            return len(self.y) // (self.batch_size * self.world)
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.passes += 1
        return self.epoch() if self.shuffle else self.ordered()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment:
            # Draws for the whole global batch, then this rank's share: under torchrun the
            # ranks' items get different crops (they share the generator's state).
            b, g, keep = len(x) * self.world, self.generator, slice(self.rank, None, self.world)
            dy = torch.randint(0, 2 * PAD + 1, (b,), device=self.device, generator=g)[keep]
            dx = torch.randint(0, 2 * PAD + 1, (b,), device=self.device, generator=g)[keep]
            flip = (torch.rand(b, device=self.device, generator=g) < 0.5)[keep]
            x = crop_flip(x, dy, dx, flip)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() / 255.0 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled pass of full batches."""
        order = torch.randperm(len(self.y), device=self.device, generator=self.generator)
        step = self.batch_size * self.world
        for i in range(len(self.y) // step):
            idx = order[i * step:(i + 1) * step][self.rank::self.world]
            yield self._prepare(self.x[idx]), self.y[idx]

    def sample(self, n: int) -> torch.Tensor:
        """The first `n` items as the model sees them (normalised, not augmented)."""
        return self._normalise(self.x[:n])

    def ordered(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every item once, in order, no augmentation, last batch partial: for evaluation."""
        for i in range(0, len(self.y), self.batch_size):
            yield self._normalise(self.x[i:i + self.batch_size]), self.y[i:i + self.batch_size]


def channel_stats(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the training images, in [0, 1] units (from at most
    10,000 evenly spaced images: more changes the 4th digit, and costs seconds)."""
    x = split.x[:: max(1, len(split) // 10_000)].reshape(-1, split.x.shape[-1])
    mean = x.mean(axis=0, dtype=np.float64) / 255.0
    std = x.std(axis=0, dtype=np.float64) / 255.0
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(np.maximum(std, 1e-6), dtype=torch.float32)
