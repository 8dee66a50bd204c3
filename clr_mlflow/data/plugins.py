"""A user's own model or data for the CLI and `mlflow run`: `module.path:callable`.

- `model=my_pkg.nets:build`: `build(num_classes, image_size) -> nn.Module`.
- `data=my_pkg.data:load`: `load() -> (train, test)`, torch Datasets of `(image, label)`
  with the image a tensor (C, H, W) or a PIL image. They go through a plain DataLoader.

The module is imported from the working directory or PYTHONPATH; inside
`installed_only()` (code a stored run names: `reproduce`, `resume`) from installed packages
and PYTHONPATH only, the working directory left out. Every way a plug-in can be wrong is a
one-line error naming the parameter, raised before any MLflow run exists.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class PluginError(ValueError):
    """A `module:callable` parameter that cannot be imported, called or used."""


def is_plugin(value: str) -> bool:
    """True for `module.path:callable` (a data folder that happens to exist wins)."""
    return bool(SPEC.match(value)) and not os.path.exists(value)


_installed_only = False


@contextlib.contextmanager
def installed_only():
    """Plug-ins resolved in the block import from installed packages and PYTHONPATH only:
    the working directory is neither added to sys.path nor searched when already there
    (`python -m` puts it first), so a file lying in it cannot be run by naming it."""
    global _installed_only
    before, _installed_only = _installed_only, True
    try:
        yield
    finally:
        _installed_only = before


def named(**params: str) -> list[str]:
    """`param=spec (module M)` for each value that names a plug-in: what would be imported."""
    return [f"{k}={v} (module {v.partition(':')[0]})" for k, v in params.items() if is_plugin(v)]


def _import(module_name: str):
    if not _installed_only:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # console scripts do not put the working directory there
        return importlib.import_module(module_name)
    here = os.path.realpath(os.getcwd())
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.realpath(p or ".") != here]
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path[:] = saved


def resolve(param: str, spec: str) -> Callable:
    """The callable named by `spec`, imported from the working directory or PYTHONPATH (see
    installed_only)."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = _import(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module's
        raise PluginError(f"Expected {param}={spec} to name an importable module, but importing {module_name} "
                          f"failed: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"Expected {param}={spec} to name a callable, but {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"Expected {param}={spec} to name a callable, but it is a {type(obj).__name__}")
    return obj


def build_model(spec: str, num_classes: int, image_size: int) -> torch.nn.Module:
    try:
        model = resolve("model", spec)(num_classes, image_size)
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"Expected model={spec}(num_classes, image_size) to build a model, but it raised "
                          f"{type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise PluginError(f"Expected model={spec} to return a torch.nn.Module, but it returned "
                          f"{type(model).__name__}")
    return model


@dataclass(frozen=True)
class PluginData:
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classes: tuple[str, ...]
    source: str
    image_shape: tuple[int, ...]

    def describe(self) -> dict[str, str | int]:
        # A digest of every image would mean reading the whole dataset: the digest here
        # covers what the plug-in says of itself (name, sizes, classes, first image's shape).
        key = repr((self.source, len(self.train), len(self.test), self.classes, self.image_shape))
        return {
            "data.source": self.source,
            "data.train_size": len(self.train),
            "data.test_size": len(self.test),
            "data.num_classes": len(self.classes),
            "data.image_shape": "x".join(map(str, self.image_shape)),
            "data.digest": "plugin-" + hashlib.sha256(key.encode()).hexdigest()[:16],
        }


def to_image_tensor(image) -> torch.Tensor:
    """(C, H, W) float in [0, 1] for a PIL image or a uint8 tensor; float tensors as given."""
    if isinstance(image, torch.Tensor):
        return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image.convert("RGB")).float() / 255.0


def collate(items) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of `(image, label)` items: images stacked as float tensors, labels as int64."""
    images, labels = zip(*items)
    return torch.stack([to_image_tensor(i) for i in images]), torch.as_tensor([int(y) for y in labels])


def labels(ds) -> np.ndarray:
    """Every label of a dataset: its `targets`/`labels` when it has them, else item by item."""
    for name in ("targets", "labels"):
        if hasattr(ds, name):
            return np.asarray(getattr(ds, name))
    return np.asarray([int(ds[i][1]) for i in range(len(ds))])


def load_data(spec: str) -> PluginData:
    """Call the data plug-in and check what it returned."""
    try:
        out = resolve("data", spec)()
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"Expected data={spec}() to return (train, test) datasets, but it raised "
                          f"{type(e).__name__}: {e}") from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise PluginError(f"Expected data={spec}() to return a (train, test) pair of datasets, but got "
                          f"{type(out).__name__}")
    for name, ds in zip(("train", "test"), out):
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")) or len(ds) == 0:
            raise PluginError(f"Expected data={spec}() to return a non-empty map-style {name} dataset, but got "
                              f"{type(ds).__name__}")
    train, test = out
    try:
        image, label = train[0]
        shape = tuple(to_image_tensor(image).shape)
        int(label)
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"Expected data={spec}() items to be (image, label) with a tensor or PIL image and an "
                          f"integer label, but train[0] gave {type(e).__name__}: {e}") from None
    classes = getattr(train, "classes", None)
    if classes is None:
        classes = [str(c) for c in range(int(max(labels(train).max(), labels(test).max())) + 1)]
    return PluginData(train, test, tuple(map(str, classes)), f"plugin:{spec}", shape)
