"""Data-parallel runs under torchrun: `torchrun --nproc_per_node N -m clr_mlflow run ...`.

Every rank runs the same code on its shard of every batch (global batch = N x batch_size);
DistributedDataParallel averages the gradients, the range test averages the loss over the
ranks before smoothing (so every rank takes the same stop decision at the same step), and
only rank 0 talks to MLflow. Without torchrun's environment nothing here does anything.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        """The rank that logs to MLflow and prints."""
        return self.rank == 0


def init(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1: gloo on the CPU, NCCL on CUDA,
    each rank on its own GPU (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def rank_from_env() -> int:
    """This process's rank as torchrun sets it (0 without torchrun), before init()."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_leader() -> bool:
    """Rank 0 of an initialised process group (or no group at all)."""
    return not active() or dist.get_rank() == 0


def mean_over_ranks(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each value averaged over the ranks, in one collective (values are 0-dim tensors)."""
    stacked = torch.stack(values)
    dist.all_reduce(stacked)  # SUM: gloo has no AVG
    return list(stacked / dist.get_world_size())


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for value in model.state_dict().values():
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def same_weights_everywhere(model: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical weights (what DDP promises)."""
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, weights_digest(model))
    return len(set(digests)) == 1


def finish() -> None:
    """Leave the process group together: a rank that tears its group down while another is
    still logging (rank 0 writes the model, the run) can abort in gloo's threads."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
