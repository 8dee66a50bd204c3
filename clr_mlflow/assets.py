"""What a run shows in MLflow beyond its metrics (tracking layer, writing): the trained
network as a Logged Model, the datasets it saw as run inputs, and a description."""
from __future__ import annotations

import copy
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # what torchvision downloads


def _source(source: str):
    if source == "torchvision:CIFAR10":
        return HTTPDatasetSource(CIFAR10_URL)
    if source.startswith("plugin:"):
        return CodeDatasetSource({"data": source.removeprefix("plugin:")})
    return LocalArtifactDatasetSource(source)


def log_datasets(source: str, digest: str, sizes: dict[str, int], num_classes: int) -> None:
    """One input per split (context training / validation / test) of the active run, so its
    Datasets panel shows what it learnt from. The digest is the run's `data.digest`, the
    one `reproduce` compares."""
    name = Path(source.removeprefix("plugin:")).name or source
    for context, size in sizes.items():
        dataset = MetaDataset(_source(source), name=f"{name}/{context}", digest=digest)
        mlflow.log_input(dataset, context=context, tags={"size": str(size), "num_classes": str(num_classes)})


def log_model(model: torch.nn.Module, example: torch.Tensor) -> str:
    """The network as the run's Logged Model `model` (loads with mlflow.pytorch.load_model),
    with a signature and input example from `example` (a few inputs). Our package's code
    travels with it, so our own layers load where clr_mlflow is not installed."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    # A CPU copy in eval mode: the caller's model keeps its device and mode.
    cpu_model = copy.deepcopy(model).cpu().eval()
    x = example.detach().float().cpu().contiguous()
    with torch.no_grad():
        out = cpu_model(x)
    info = mlflow.pytorch.log_model(
        cpu_model, name="model", signature=infer_signature(x.numpy(), out.numpy()),
        input_example=x.numpy().astype(np.float32),
        serialization_format="pickle",  # loads back as the nn.Module (pt2 gives an exported graph)
        # Naming the requirements skips MLflow's import tracing, which costs seconds.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        code_paths=[str(Path(__file__).parent)])
    return info.model_uri


def describe_run(lines: list[str]) -> None:
    """The run's description (the `mlflow.note.content` tag the UI shows on the run page)."""
    mlflow.set_tag("mlflow.note.content", "\n".join(lines))
