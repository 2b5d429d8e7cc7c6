"""Several processes, one run (`torchrun --nproc_per_node=N train.py ...`).

Every rank builds the same global batch of each task (same seeds) and trains on its own
contiguous part of it; gradients are averaged across ranks before the optimizer step, so
N ranks with batch B make the update of one process with batch N*B. Gradient methods
that combine per-task gradients (PCGrad) average each task's gradient first and then
project identically on every rank, since averaging projected gradients would be another
algorithm. torch's DistributedDataParallel cannot serve here: its reducer averages the
summed gradient of one forward, and a step here is several task forwards whose per-task
gradients PCGrad needs, so the averaging is this module's explicit all-reduce.
Only rank 0 writes the run directory.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def adopt_submitit_tasks():
    """Under submitit with several tasks per job (`hydra.launcher.tasks_per_node=N`), make
    each task a rank, as torchrun would: export RANK, WORLD_SIZE, LOCAL_RANK and the
    master address that submitit derives from the job. Call before choosing a device."""
    if "WORLD_SIZE" in os.environ:  # torchrun's, or already adopted
        return
    try:
        import submitit
        tasks = submitit.JobEnvironment().num_tasks
    except (ImportError, RuntimeError):  # not a submitit job
        return
    if tasks > 1:
        # overwrite: a MASTER_PORT already set is the port to use, and submitit reads it
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes; (rank, world size), (0, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        # NCCL for the GPUs' gradients, gloo for host-side flags (`agree`)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def launch_command() -> str:
    """How to start this run again with as many processes (a resume needs as many)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return "python train.py"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = f"--nnodes={world // local} " if world > local else ""
    return f"torchrun {nodes}--nproc_per_node={local} train.py"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def average_(tensors: list[torch.Tensor]):
    """Replace each tensor by its mean over the ranks, in one all-reduce."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def broadcast_(tensor: torch.Tensor):
    """Replace the tensor by rank 0's, in place."""
    if world_size() > 1:
        dist.broadcast(tensor, src=0)


def any_(flag: bool) -> bool:
    """True on every rank if it is true on any: ranks must stop at the same step."""
    return agree(flag=flag)["flag"]


def agree(**flags: bool) -> dict[str, bool]:
    """Each flag true on every rank if it is true on any, in one all-reduce: a decision
    that leads to a collective (save, log, stop) is taken by all ranks or by none, whatever
    each rank's clock or signals say."""
    if world_size() == 1:
        return {k: bool(v) for k, v in flags.items()}
    t = torch.tensor([int(bool(v)) for v in flags.values()])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(flags, map(bool, t.tolist())))


def least(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum over the ranks."""
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_object(value):
    """Rank 0's value on every rank (the run directory, for example)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(value) -> list:
    """Every rank's value, in rank order, on every rank (each rank's RNG state, say)."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out
