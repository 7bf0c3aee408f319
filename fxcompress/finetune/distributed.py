"""Thin helpers over torch.distributed that behave as a single process when no process group is initialised.

`init_from_env` starts the process group from the variables `torchrun` sets (gloo on CPU, NCCL on CUDA);
`rank`, `world_size`, `is_main` say where this process stands; `broadcast_object`, `barrier`, `all_reduce_sum`
and `broadcast_buffers` are collectives that reduce to the identity without a group, so the trainer and the
loop run the same code under `torchrun` and in a plain process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import OptionError, valid_choice

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def initialized() -> bool:
    """Whether a torch.distributed process group is running in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a process without a group: the process that writes files and prints."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for_rank() -> torch.device:
    """cuda:LOCAL_RANK where CUDA is available, else the CPU."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the process group from torchrun's variables; False (and nothing done) without WORLD_SIZE.

    `backend` defaults to NCCL where CUDA is available and gloo otherwise; under NCCL the current CUDA device
    becomes cuda:LOCAL_RANK.
    """
    if "WORLD_SIZE" not in os.environ:
        return False
    if initialized():
        return True
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise OptionError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start the run with torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    valid_choice("distributed backend", backend, ("gloo", "nccl"))
    if backend == "nccl":
        torch.cuda.set_device(device_for_rank())
    dist.init_process_group(backend)
    return True


def shutdown() -> None:
    """Destroy the process group if one is running."""
    if initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if initialized():
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (a picklable object); `obj` itself without a group."""
    if not initialized():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (in place; on the rank's device under NCCL)."""
    if initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DistributedDataParallel does
    before each forward; after training, ranks otherwise keep the statistics of their own last batch."""
    if initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
