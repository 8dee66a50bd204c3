"""What a run shows in MLflow beyond its metrics (tracking layer, writing): the trained
network as a Logged Model, the datasets it saw as run inputs, and a description. Each
goes through delivery.deliver, so an outage of the store spools it.

A spooled model is never unpickled. While the store is away the model is saved into the
spool as the MLflow Model directory `mlflow.pytorch.save_model` writes (the same files
`log_model` would upload), and `sync` uploads that directory as it is, through MLflow's
public Logged Model calls (create_logged_model, log_outputs, log_model_artifacts,
finalize_logged_model), reading only its MLmodel YAML. Loading it back with
`mlflow.pytorch.load_model`, as the old replay did, unpickles `data/model.pth`: code from a
file anyone who could write the spool could have swapped. Keeping a state_dict (weights
only) plus a recipe instead would not cover plug-in models nor give the same artifacts, so
the directory itself travels; whoever loads the Logged Model later unpickles it exactly as
they would one logged directly.
"""
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

from clr_mlflow.tracking import delivery
from clr_mlflow.tracking import runs as tracking
from clr_mlflow.tracking.delivery import Replay, replayer

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
    run_id = mlflow.active_run().info.run_id
    for context, size in sizes.items():
        delivery.deliver(run_id, "inputs", {"source": source, "name": f"{name}/{context}", "digest": digest,
                                            "context": context,
                                            "tags": {"size": str(size), "num_classes": str(num_classes)}})


@replayer("inputs")
def _replay_inputs(ctx: Replay, entry: dict) -> None:
    dataset = MetaDataset(_source(entry["source"]), name=entry["name"], digest=entry["digest"])
    with delivery.as_active_run(ctx.run_id):  # the store keeps one input per dataset and run: no duplicate
        mlflow.log_input(dataset, context=entry["context"], tags=entry["tags"])


def _model_args(cpu_model: torch.nn.Module, x: torch.Tensor) -> dict:
    """log_model's and save_model's arguments besides the model: a signature and input
    example from `x` (a few inputs). Our package's code travels with the model, so our own
    layers load where clr_mlflow is not installed."""
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = cpu_model(x)
    return dict(
        signature=infer_signature(x.numpy(), out.numpy()), input_example=x.numpy().astype(np.float32),
        serialization_format="pickle",  # loads back as the nn.Module (pt2 gives an exported graph)
        # Naming the requirements skips MLflow's import tracing, which costs seconds.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        code_paths=[str(Path(__file__).parents[1])])  # the whole clr_mlflow package


def log_model(model: torch.nn.Module, example: torch.Tensor) -> str | None:
    """The network as the run's Logged Model `model` (loads with mlflow.pytorch.load_model);
    its URI, or None when the store is away (saved in the run's spool then)."""
    import mlflow.pytorch

    # A CPU copy in eval mode: the caller's model keeps its device and mode.
    cpu_model = copy.deepcopy(model).cpu().eval()
    x = example.detach().float().cpu().contiguous()
    args, logged = _model_args(cpu_model, x), []

    def stage(folder: Path) -> None:  # the directory log_model would upload; sync uploads it unread
        mlflow.pytorch.save_model(cpu_model, str(folder / "model"), **args)

    delivery.deliver(mlflow.active_run().info.run_id, "model", {}, stage=stage,
                     send=lambda: logged.append(mlflow.pytorch.log_model(cpu_model, name="model", **args)))
    return logged[0].model_uri if logged else None


@replayer("model")
def _replay_model(ctx: Replay, entry: dict) -> None:
    """The spooled MLflow Model directory as the run's Logged Model `model`, uploaded as it
    is: nothing in it is loaded (see the module's docstring)."""
    import shutil
    import tempfile

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run = ctx.client.get_run(ctx.run_id)
    for output in (run.outputs.model_outputs if run.outputs else None) or []:  # a second sync logs no second model
        logged = ctx.client.get_logged_model(output.model_id)
        if logged.name == "model" and str(logged.status).endswith("READY"):
            return
    model = ctx.client.create_logged_model(run.info.experiment_id, name="model", source_run_id=ctx.run_id,
                                           params=dict(run.data.params))
    try:
        ctx.client.log_outputs(ctx.run_id, [LoggedModelOutput(model.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="clr_mlflow_") as tmp:
            local = Path(tmp) / "model"
            shutil.copytree(ctx.folder(entry) / "model", local, symlinks=True)  # checked: no link leads out
            mlmodel = Model.load(str(local / "MLmodel"))  # YAML only
            # What log_model writes into MLmodel once the Logged Model exists.
            mlmodel.model_id = mlmodel.model_uuid = model.model_id
            mlmodel.run_id, mlmodel.artifact_path = ctx.run_id, model.artifact_location
            mlmodel.save(str(local / "MLmodel"))
            ctx.client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        ctx.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    ctx.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    ctx.artifacts += 1


def describe_run(lines: list[str]) -> None:
    """The run's description (the `mlflow.note.content` tag the UI shows on the run page)."""
    tracking.set_tags({"mlflow.note.content": "\n".join(lines)})
