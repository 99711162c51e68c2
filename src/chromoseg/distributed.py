"""Data-parallel training helpers (torch DDP): gloo on CPU, nccl on GPU.

`torchrun --nproc_per_node N -m chromoseg.cli train` sets RANK / WORLD_SIZE / LOCAL_RANK; `chromoseg
train` then trains with N processes. Every rank draws the same seeded global batch of
`train.batch_size` images and keeps its own contiguous shard of `batch_size / N` images, so the data
stream (sampling and augmentation) is exactly that of a single-process run; gradients are averaged
by DDP. Rank 0 alone validates, logs to MLflow and writes outputs and checkpoints.

Without those variables (or with WORLD_SIZE=1) every function here is a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Rank layout from torchrun's environment variables (single process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def per_rank_batch(global_batch: int, samples_per_epoch: int, info: DistInfo) -> int:
    """Images per rank and step; the global batch must split evenly so that all ranks weigh the same."""
    if global_batch % info.world_size:
        raise ValueError(
            f"train.batch_size={global_batch} does not split over {info.world_size} processes; "
            f"use a multiple of {info.world_size} (it is the global batch, shared by all ranks)"
        )
    last = samples_per_epoch % global_batch
    if last and last < info.world_size:
        raise ValueError(
            f"the last batch of an epoch ({last} of train.samples_per_epoch={samples_per_epoch}) is "
            f"smaller than the {info.world_size} processes; make samples_per_epoch a multiple of "
            f"train.batch_size"
        )
    return global_batch // info.world_size


def shard(batch: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous part of a global batch (dim 0); a last partial batch splits unevenly."""
    if not info.enabled:
        return batch
    return torch.tensor_split(batch, info.world_size)[info.rank]


def threads_per_rank(requested: int, info: DistInfo) -> int:
    """Intra-op threads: `requested`, or (0) the cores shared evenly by the local ranks."""
    if requested > 0 or not info.enabled:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // info.local_world_size)


def init(info: DistInfo, device: str) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU)."""
    if not info.enabled:
        return
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    log.info("DDP: rank %d of %d (%s)", info.rank, info.world_size, backend)


def wrap(model: torch.nn.Module, info: DistInfo, device: str) -> torch.nn.Module:
    """DistributedDataParallel around `model` (unchanged when not distributed)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if device.startswith("cuda") else None
    # Encoders other than ResNet keep stages that encoder_depth < 5 never runs (model.drop_unused_stages).
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def any_rank(flag: bool, info: DistInfo, device: str = "cpu") -> bool:
    """True on every rank when `flag` is true on some rank (e.g. a stop request)."""
    if not info.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
