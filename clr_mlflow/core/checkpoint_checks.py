"""A checkpoint checked before anything uses it: `validate_checkpoint(state, model, optimizer)`
raises checkpoint.CheckpointError with one line naming the first part that is missing or
wrong (a key, a type, a tensor's shape against the model's and optimizer's own, a position
that cannot be), so that `resume` refuses a bad file before it reopens the run.

It checks what training.py's `_Loop.state()` and checkpoint_writer put in: `steps` (model,
optimizer, scaler, loss_fn), `scheduler`, `rng`, `epoch_rng`, `loop`, `bounds`."""
from __future__ import annotations

import math
import numbers

import torch

from clr_mlflow.core.checkpoint import CheckpointError

PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DistributedDataParallel wrap the keys


class _Bad(Exception):
    """Where (a dotted path) and what was expected there."""


def _int(x, low: int = 0) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _need(ok: bool, where: str, expected: str, got) -> None:
    if not ok:
        shown = f"a {type(got).__name__}" if isinstance(got, (dict, list, tuple, torch.Tensor)) else repr(got)
        raise _Bad(f"{where} to be {expected}, but got {shown}"[:400])


def _get(d: dict, key: str, where: str, kind: type | tuple, expected: str):
    _need(isinstance(d, dict), where, "a dict", d)
    if key not in d:
        raise _Bad(f"{where} to have {key!r}, but it is missing")
    value = d[key]
    _need(isinstance(value, kind), f"{where}.{key}", expected, value)
    return value


def _bare(key: str) -> str:
    for p in PREFIXES:
        while key.startswith(p):
            key = key[len(p):]
    return key


def _tensor_like(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    _need(isinstance(got, torch.Tensor), where, "a tensor", got)
    if tuple(got.shape) != tuple(want.shape):
        raise _Bad(f"{where} to have shape {tuple(want.shape)}, but it has {tuple(got.shape)}")


def _model(weights: dict, model: torch.nn.Module | None) -> None:
    for k, v in weights.items():
        _need(isinstance(k, str) and isinstance(v, torch.Tensor), f"steps.model[{k!r}]", "a tensor", v)
    if model is None:
        return
    own = {_bare(k): v for k, v in model.state_dict().items()}
    got = {_bare(k): v for k, v in weights.items()}
    missing, extra = sorted(set(own) - set(got)), sorted(set(got) - set(own))
    if missing or extra:
        wrong = [f"lacks {missing[0]}"] * bool(missing) + [f"has an unknown {extra[0]}"] * bool(extra)
        raise _Bad(f"steps.model to hold the weights of the run's model, but it {' and '.join(wrong)}")
    for k, v in own.items():
        _tensor_like(got[k], v, f"steps.model[{k!r}]")


def _optimizer(state: dict, optimizer: torch.optim.Optimizer | None) -> None:
    groups = _get(state, "param_groups", "steps.optimizer", list, "a list")
    per_param = _get(state, "state", "steps.optimizer", dict, "a dict")
    for i, g in enumerate(groups):
        _get(g, "params", f"steps.optimizer.param_groups[{i}]", list, "a list")
        _need(_number(g.get("lr")), f"steps.optimizer.param_groups[{i}].lr", "a finite number", g.get("lr"))
    if optimizer is None:
        return
    own = optimizer.param_groups
    _need(len(groups) == len(own), "steps.optimizer.param_groups", f"{len(own)} group(s)", len(groups))
    shapes = {}
    for i, (g, mine) in enumerate(zip(groups, own)):
        _need(len(g["params"]) == len(mine["params"]), f"steps.optimizer.param_groups[{i}].params",
              f"{len(mine['params'])} parameter(s)", len(g["params"]))
        shapes.update(zip(g["params"], (p.shape for p in mine["params"])))
    for index, entry in per_param.items():
        _need(index in shapes, f"steps.optimizer.state[{index!r}]", "the state of a parameter in param_groups", index)
        _need(isinstance(entry, dict), f"steps.optimizer.state[{index!r}]", "a dict", entry)
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # momentum_buffer, exp_avg...; not `step`
                if tuple(value.shape) != tuple(shapes[index]):
                    raise _Bad(f"steps.optimizer.state[{index}].{name} to have shape {tuple(shapes[index])}, "
                               f"but it has {tuple(value.shape)}")


def _rng(rng, where: str) -> None:
    _get(rng, "python", where, (tuple, list), "a tuple")
    numpy = _get(rng, "numpy", where, dict, "a dict")
    key = _get(numpy, "key", f"{where}.numpy", torch.Tensor, "a tensor")
    _need(tuple(key.shape) == (624,), f"{where}.numpy.key", "a tensor of shape (624,)", tuple(key.shape))
    _need(_int(numpy.get("pos")) and numpy["pos"] <= 624, f"{where}.numpy.pos", "an integer in [0, 624]",
          numpy.get("pos"))
    torch_state = _get(rng, "torch", where, torch.Tensor, "a tensor")
    _need(torch_state.dtype == torch.uint8, f"{where}.torch", "a uint8 tensor", str(torch_state.dtype))
    _get(rng, "cuda", where, (list, tuple), "a list")
    if rng.get("loader") is not None:
        _need(isinstance(rng["loader"], torch.Tensor), f"{where}.loader", "a tensor or None", rng["loader"])


def _loop(loop: dict) -> int:
    t = _get(loop, "t", "loop", numbers.Integral, "a non-negative integer")
    _need(_int(t), "loop.t", "a non-negative integer", t)
    epoch = _get(loop, "epoch", "loop", numbers.Integral, "a non-negative integer")
    _need(_int(epoch), "loop.epoch", "a non-negative integer", epoch)
    start = _get(loop, "epoch_start", "loop", numbers.Integral, "an integer")
    _need(_int(start) and start <= t, "loop.epoch_start", f"an integer in [0, t={t}]", start)
    loss_sum = _get(loop, "loss_sum", "loop", torch.Tensor, "a tensor")
    _need(loss_sum.numel() == 1, "loop.loss_sum", "a one-element tensor", tuple(loss_sum.shape))
    _get(loop, "rows", "loop", list, "a list")
    _need(_number(loop.get("seconds")) and loop["seconds"] >= 0, "loop.seconds", "a non-negative number",
          loop.get("seconds"))
    smoother = _get(loop, "smoother", "loop", dict, "a dict")
    _get(smoother, "count", "loop.smoother", numbers.Integral, "an integer")
    for name in ("lrs", "losses", "smoothed"):
        series = _get(loop, name, "loop", torch.Tensor, "a tensor")
        _need(tuple(series.shape) == (t,), f"loop.{name}", f"a tensor of shape ({t},), one value per iteration",
              tuple(series.shape))
    return t


def validate_checkpoint(state, model: torch.nn.Module | None = None,
                        optimizer: torch.optim.Optimizer | None = None, source: str = "the checkpoint") -> int:
    """Raise CheckpointError (one line: `Expected <source>'s <part> to be ..., but ...`) unless
    `state` is a whole checkpoint that `model` and `optimizer` (when given: built as the run
    builds them) can load. Returns its iteration t."""
    try:
        _need(isinstance(state, dict), "the file", "a dict", state)
        steps = _get(state, "steps", "state", dict, "a dict")
        _model(_get(steps, "model", "steps", dict, "a dict of tensors"), model)
        _optimizer(_get(steps, "optimizer", "steps", dict, "a dict"), optimizer)
        for key in ("scaler", "loss_fn"):
            _get(steps, key, "steps", (dict, type(None)), "a dict or None")
        scheduler = _get(state, "scheduler", "state", dict, "a dict")
        last = _get(scheduler, "last_epoch", "scheduler", numbers.Integral, "an integer")
        _need(_int(last), "scheduler.last_epoch", "a non-negative integer", last)
        lrs = _get(scheduler, "last_lr", "scheduler", (list, tuple), "a list of numbers")
        _need(len(lrs) > 0 and all(_number(x) and x >= 0 for x in lrs), "scheduler.last_lr",
              "a list of non-negative finite numbers", lrs)
        _rng(_get(state, "rng", "state", dict, "a dict"), "rng")
        if state.get("epoch_rng") is not None:
            _rng(_get(state, "epoch_rng", "state", dict, "a dict or None"), "epoch_rng")
        t = _loop(_get(state, "loop", "state", dict, "a dict"))
        _need(last == t, "scheduler.last_epoch", f"loop.t={t}", last)
        bounds = _get(state, "bounds", "state", (list, tuple), "[base_lr, max_lr, rule]")
        _need(len(bounds) == 3 and _number(bounds[0]) and _number(bounds[1]) and 0 < bounds[0] <= bounds[1]
              and isinstance(bounds[2], str), "bounds", "[base_lr, max_lr, rule] with 0 < base_lr <= max_lr", bounds)
        if "world_size" in state:
            _need(_int(state["world_size"], 1), "world_size", "a positive integer", state["world_size"])
    except _Bad as e:
        raise CheckpointError(f"Expected {source}'s {e}") from None
    return t
