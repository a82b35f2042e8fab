"""Training on several processes: one code path for 1 and N, switched on by torchrun's environment.

    torchrun --standalone --nproc_per_node 2 -m pipeline.stages.finetune ...  # or train.nproc: 2

Under torchrun (WORLD_SIZE > 1) `init` joins the process group (gloo on CPU, NCCL on CUDA, one
GPU per local rank); alone it does nothing and every helper below is the identity. The training
loop splits each *global* batch (the configured batch_size) into contiguous shards, one per rank,
scales each rank's summed loss so that DistributedDataParallel's gradient average equals the
gradient of the whole batch, and lets only rank 0 write. So N processes train the same model as
one process would on the same global batch, up to floating-point summation order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The one process that writes checkpoints, metrics, state and MLflow."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, size: int) -> slice:
        """This rank's contiguous part of a global batch of `size` (sizes differ by at most 1;
        a rank may get nothing when size < world_size)."""
        base, extra = divmod(size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def from_env() -> Dist:
    """The process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group if there is one (idempotent); return (Dist, the device this
    rank trains on: cuda:<local rank> when training on CUDA)."""
    dist = from_env()
    if not dist.active:
        return dist, device
    import torch.distributed as td

    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def all_sum(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64)."""
    if not dist.active:
        return list(values)
    import torch.distributed as td

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(tensor)
    return tensor.tolist()


def all_gather(value, dist: Dist) -> list:
    """[value of rank 0, value of rank 1, ...] (any picklable value; small ones only)."""
    if not dist.active:
        return [value]
    import torch.distributed as td

    gathered: list = [None] * dist.world_size
    td.all_gather_object(gathered, value)
    return gathered


def barrier(dist: Dist) -> None:
    if dist.active:
        import torch.distributed as td
        td.barrier()
