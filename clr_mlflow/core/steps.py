"""One optimizer step on any model, batch and loss: the piece both loops are generic over.

A batch is whatever the loader yields — `(x, y)`, a dict, a list of images with a list of
target dicts, a dataclass — and is moved to the device wherever tensors sit in it. The
loss is `loss_fn(model, batch)`: a scalar tensor, or a dict of them that is summed (each
term is also reported, as detection models return `loss_classifier`, `loss_box_reg`...).
Values stay on the device: nothing here calls `.item()`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clr_mlflow.core import distributed
from clr_mlflow.core.engine import module_modes, restore_modes

LossFn = Callable[[nn.Module, Any], "torch.Tensor | Mapping[str, torch.Tensor]"]


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor inside it on `device` (containers keep their type)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return moved if type(batch) is dict else type(batch)(moved)
        except TypeError:  # a mapping type that cannot be built from a dict
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if hasattr(batch, "to") and callable(batch.to):  # e.g. a HuggingFace BatchEncoding
        return batch.to(device)
    return batch


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def inputs_and_targets(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y) of a classification batch, or a TypeError saying what to pass instead."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor) \
            and isinstance(batch[1], torch.Tensor):
        return batch[0], batch[1]
    raise TypeError(f"Expected (inputs, targets) tensor batches for the default loss_fn (loss_fn=None), but got "
                    f"{type(batch).__name__}: pass loss_fn(model, batch) for other batch structures")


class CrossEntropy:
    """The default loss: cross-entropy of `model(x)` against `y` for `(x, y)` batches.

    It also counts correct predictions, on the device, so training can report an epoch's
    accuracy without a host sync per step (`take_accuracy`)."""

    def __init__(self) -> None:
        self.correct: torch.Tensor | None = None
        self.seen = 0

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = inputs_and_targets(batch)
        out = model(x)
        check_classification(out, y)
        right = (out.detach().argmax(1) == y).sum()
        self.correct = right if self.correct is None else self.correct + right
        self.seen += len(y)
        return F.cross_entropy(out, y)

    def state_dict(self) -> dict:
        """The hits counted since the last take_accuracy (a checkpoint mid-epoch keeps them)."""
        return {"correct": self.correct, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.correct, self.seen = state["correct"], state["seen"]

    def take_accuracy(self) -> float | None:
        """Accuracy since the last call (one host sync), or None if nothing was seen."""
        correct, seen = self.correct, self.seen
        self.correct, self.seen = None, 0
        return None if not seen else correct.item() / seen


PASS_LOSS_FN = "pass loss_fn(model, batch) returning the loss"


def check_classification(out: Any, y: torch.Tensor) -> None:
    """What the default cross-entropy can read: a logits tensor (N, C, ...) and integer class
    targets (N, ...). Anything else — float targets (a regression: cross-entropy over one
    column is exactly 0), a dict or tuple output, mismatched shapes — is a one-line error
    instead of a silent zero loss or a failure deep inside the run. Shape and dtype checks
    only: no host sync."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"Expected the model to return a logits tensor for the default loss_fn (loss_fn=None), but "
                        f"got {type(out).__name__}: {PASS_LOSS_FN}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"Expected integer class targets for the default loss_fn (loss_fn=None), but got {y.dtype} "
                        f"targets of shape {tuple(y.shape)}: {PASS_LOSS_FN} (e.g. mse_loss for a regression)")
    if out.dim() < 2 or out.shape[0] != y.shape[0] or out.shape[2:] != y.shape[1:]:
        raise ValueError(f"Expected logits (N, C, ...) and targets (N, ...) for the default loss_fn (loss_fn=None), "
                         f"but got logits {tuple(out.shape)} and targets {tuple(y.shape)}: {PASS_LOSS_FN}")


def _carried_loss(out: Any) -> Any:
    """The `loss` an output carries: a Hugging Face ModelOutput (a mapping with a `loss`
    attribute), `{"loss": l, "logits": ...}`, or any object with a tensor `.loss`; None if none."""
    if isinstance(out, Mapping):
        return out.get("loss")
    loss = getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _describe(values: Mapping) -> str:
    return ", ".join(f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                     for k, v in values.items())


def total_loss(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the loss to minimise, its named terms) from what loss_fn returned: a scalar tensor;
    an output that carries a `loss` (its loss, the rest ignored); or a dict of scalar losses
    (summed, each a named term). Anything else is a one-line error naming what was there."""
    carried = _carried_loss(out)
    if carried is not None:
        if isinstance(carried, torch.Tensor) and carried.numel() == 1:
            return carried.reshape(()), {}
        raise TypeError(f"Expected the loss that loss_fn's output carries to be a scalar tensor, but got "
                        f"{_describe({'loss': carried})}")
    if isinstance(out, Mapping):
        if not out:
            raise ValueError("Expected loss_fn to return a loss or a non-empty dict of losses, but got {}")
        bad = {k: v for k, v in out.items() if not (isinstance(v, torch.Tensor) and v.numel() == 1)}
        if bad:
            raise TypeError(f"Expected loss_fn to return a scalar loss, a dict of scalar losses or an output with a "
                            f"'loss', but got a {type(out).__name__} with non-scalar {_describe(bad)}")
        terms = {str(k): v.reshape(()) for k, v in out.items()}
        return sum(terms.values()), terms
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return out.reshape(()), {}
    shape = f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""
    raise TypeError(f"Expected loss_fn to return a scalar loss, a dict of scalar losses or an output with a 'loss', "
                    f"but got {type(out).__name__}{shape}")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in `dtype` (bf16 needs no loss scaling), or a no-op for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class Stepper:
    """Runs one optimizer step over `accumulate` micro-batches: forward, loss, backward
    (scaled by 1/accumulate, and by a GradScaler's scale when one is given), step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 device: torch.device, accumulate: int = 1, scaler: torch.amp.GradScaler | None = None,
                 amp: torch.dtype | None = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.device, self.accumulate, self.scaler, self.amp = device, accumulate, scaler, amp

    def state_dict(self) -> dict:
        """What the steps change: weights, optimizer state, a GradScaler's scale and a loss's
        own counters (CrossEntropy's hits)."""
        loss_state = getattr(self.loss_fn, "state_dict", None)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "loss_fn": loss_state() if loss_state else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if state["loss_fn"] is not None:
            self.loss_fn.load_state_dict(state["loss_fn"])

    def step(self, micro_batches: Sequence[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
        """(mean loss, mean of each named term, skipped): `skipped` is True when the
        GradScaler found inf/NaN gradients and left the weights alone."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, term_sums = None, {}
        for batch in micro_batches:
            with autocast(self.device, self.amp):
                loss, terms = total_loss(self.loss_fn(self.model, to_device(batch, self.device)))
            scaled = loss / len(micro_batches) if len(micro_batches) > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss = loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            for name, term in terms.items():
                term = term.detach().float()
                term_sums[name] = term if name not in term_sums else term_sums[name] + term
        skipped = False
        if self.scaler is not None:
            # The scaler lowers its scale exactly when it skipped the step (inf/NaN grads);
            # reading the scale is a host sync, paid only by users who pass a scaler.
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
        else:
            self.optimizer.step()
        n = len(micro_batches)
        if n > 1:
            loss_sum, term_sums = loss_sum / n, {k: v / n for k, v in term_sums.items()}
        if distributed.active():  # every rank sees the mean loss, so all take the same decisions
            loss_sum, *terms = distributed.mean_over_ranks([loss_sum, *term_sums.values()])
            term_sums = dict(zip(term_sums, terms))
        return loss_sum, term_sums, skipped


def cycle(loader: Iterable) -> Iterator:
    """The loader's batches, starting a new pass whenever one ends (a DataLoader with
    shuffle=True draws a new order each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("Expected loader to yield batches, but it yielded none")


Evaluator = Callable[[nn.Module, Iterable], dict[str, float]]


def classification_eval(device: torch.device, amp: torch.dtype | None = None) -> Evaluator:
    """Mean cross-entropy and accuracy over every item of an `(x, y)` loader."""

    def run(model: nn.Module, loader: Iterable) -> dict[str, float]:
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        n = 0
        for batch in loader:
            x, y = inputs_and_targets(to_device(batch, device))
            with autocast(device, amp):
                out = model(x)
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
            n += len(y)
        if n == 0:
            raise ValueError("Expected val_loader to yield batches, but it yielded none")
        return {"val_loss": loss_sum.item() / n, "accuracy": correct.item() / n}

    return run


def metric_eval(metric_fn: Callable[[nn.Module, Iterable], float]) -> Evaluator:
    """A user's `metric_fn(model, val_loader) -> float` (higher is better), read as the
    accuracy of the paper's accuracy-vs-lr test."""
    return lambda model, loader: {"accuracy": float(metric_fn(model, loader))}


def evaluate(evaluator: Evaluator, model: nn.Module, loader: Iterable) -> dict[str, float]:
    """Run an evaluator in eval mode without gradients, then put every submodule's mode back
    (`model.train(True)` would also wake a submodule the user froze in eval mode)."""
    modes = module_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            return evaluator(model, loader)
    finally:
        restore_modes(modes)
