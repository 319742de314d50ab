"""torchrun integration: process group set-up, DDP wrapping, sharding, metric reduction."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from toolkit.errors import TkError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Rank information set by torchrun (WORLD_SIZE, RANK, LOCAL_RANK)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise TkError("WORLD_SIZE / RANK / LOCAL_RANK must be integers") from None
    return DistInfo(rank, world, local)


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group: NCCL on GPU, gloo on CPU."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    from toolkit import env

    timeout = datetime.timedelta(seconds=env.number("TK_DIST_TIMEOUT", 600.0, minimum=1.0))
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as exc:
        raise TkError(f"rank {info.rank}: cannot join the process group ({exc})") from None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def ddp(module: torch.nn.Module, device: torch.device, *, find_unused: bool
        ) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel for ``device`` (the one place tk
    wraps). ``find_unused``: the trainable set may change between epochs (gradual
    unfreezing)."""
    kwargs: dict[str, Any] = {"find_unused_parameters": find_unused}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    return torch.nn.parallel.DistributedDataParallel(module, **kwargs)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class EpochSampler(torch.utils.data.Sampler[Any]):
    """Indices for one epoch: a permutation seeded by (seed, epoch) when shuffling, split
    across ranks. ``pad=True`` (training) repeats a few indices so every rank gets the same
    number of batches; ``pad=False`` (evaluation) gives each index to exactly one rank."""

    def __init__(self, n: int, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                 pad: bool = True, with_epoch: bool = False,
                 weights: Sequence[float] | None = None):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        # per-index weights: the epoch's n indices are drawn with replacement by a
        # WeightedRandomSampler seeded like the permutation (class-balanced sampling)
        self.weights = None if weights is None else list(weights)
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.with_epoch = with_epoch  # yield (index, epoch) for per-sample seeding
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle and self.weights is not None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = list(torch.utils.data.WeightedRandomSampler(
                self.weights, self.n, replacement=True, generator=g))
        elif self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.world_size > 1 and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order += order[:extra]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Any]:
        if self.with_epoch:
            return iter([(i, self.epoch) for i in self._indices()])
        return iter(self._indices())

    def __len__(self) -> int:
        if self.pad and self.world_size > 1:
            return -(-self.n // self.world_size)
        return len(range(self.rank, self.n, self.world_size))
