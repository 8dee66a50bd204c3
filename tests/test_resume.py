"""Checkpoints: the training loop continued from a checkpoint taken mid-epoch ends exactly
where the uninterrupted loop ends (CPU, bit for bit), for a DataLoader with dropout and for
our augmented Batches; the file loads with weights_only=True."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clr_mlflow.core import checkpoint
from clr_mlflow.data import datasets as data
from clr_mlflow.data.batches import Batches, channel_stats
from clr_mlflow.core.schedules import ScheduleLR, make_schedule
from clr_mlflow.core.steps import CrossEntropy, Stepper, classification_eval
from clr_mlflow.core.training import train

TOTAL = 40


@pytest.fixture(scope="module")
def images(cifar, tmp_path_factory):
    return data.load(str(cifar), tmp_path_factory.mktemp("d"), limit_train=120, limit_test=40, seed=0)


def setup(kind: str, seed: int, images):
    """A fresh model, optimizer, schedule and loader; `seed` only sets the initial weights
    and the loader's generator, which a resumed run must overwrite from the checkpoint."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = ScheduleLR(opt, make_schedule("triangular2", 0.01, 0.1, 6, TOTAL, 1.0, 0.1, 100.0))
    if kind == "dataloader":
        x = torch.from_numpy(images.train.x).permute(0, 3, 1, 2).float() / 255
        loader = DataLoader(TensorDataset(x, torch.from_numpy(images.train.y)), batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        val = DataLoader(TensorDataset(x[:32], torch.from_numpy(images.train.y[:32])), batch_size=16)
    else:
        mean, std = channel_stats(images.train)
        loader = Batches(images.train, 16, torch.device("cpu"), mean, std, True, seed)
        val = Batches(images.test, 16, torch.device("cpu"), mean, std, False, 0, shuffle=False)
    stepper = Stepper(model, opt, CrossEntropy(), torch.device("cpu"))
    return stepper, scheduler, loader, val


def run(stepper, scheduler, loader, val, **kw):
    return train(stepper, scheduler, loader, TOTAL, val_loader=val, evaluator=classification_eval(torch.device("cpu")),
                 progress=False, sync_every=4, **kw)


@pytest.mark.parametrize("kind", ["dataloader", "batches"])
def test_resuming_from_a_mid_epoch_checkpoint_ends_exactly_where_the_uninterrupted_run_ends(kind, images, tmp_path):
    saved = {}

    def keep(state):  # through the file, as a resume reads it
        saved[state["loop"]["t"]] = checkpoint.load(checkpoint.save(state, tmp_path / f"{state['loop']['t']}.pt"))

    stepper, scheduler, loader, val = setup(kind, 0, images)
    full = run(stepper, scheduler, loader, val, checkpoint_every=5, on_checkpoint=keep)
    per_epoch = len(loader)
    assert sorted(saved) == list(range(5, TOTAL + 1, 5))
    at = next(t for t in saved if t % per_epoch not in (0, 1))  # inside an epoch, not at its edge
    assert saved[at]["epoch_rng"] is not None and saved[at]["loop"]["t"] == at

    stepper2, scheduler2, loader2, val2 = setup(kind, 123, images)  # other weights and data order
    resumed = run(stepper2, scheduler2, loader2, val2, resume=saved[at])
    for (k, a), b in zip(stepper.model.state_dict().items(), stepper2.model.state_dict().values()):
        assert torch.equal(a, b), k
    np.testing.assert_array_equal(resumed.losses, full.losses)
    np.testing.assert_array_equal(resumed.lrs, full.lrs)
    np.testing.assert_array_equal(resumed.smoothed, full.smoothed)
    assert resumed.epochs.equals(full.epochs)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_a_checkpoint_is_plain_tensors_and_a_torn_or_foreign_file_is_one_line(images, tmp_path):
    stepper, scheduler, loader, val = setup("batches", 0, images)
    states = []
    run(stepper, scheduler, loader, val, checkpoint_every=-1, on_checkpoint=states.append)
    assert [s["loop"]["t"] for s in states] == [len(loader) * (e + 1) for e in range(len(states) - 1)] + [TOTAL]
    assert all(s["epoch_rng"] is None for s in states)  # at epoch ends: the next epoch starts fresh
    path = checkpoint.save(states[0], tmp_path / "c.pt")
    torch.load(path, weights_only=True)  # nothing but tensors and plain values
    assert not list(tmp_path.glob("*.tmp"))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.load(path)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="format"):
        checkpoint.load(tmp_path / "other.pt")
