"""DataLoaders that repeat exactly for a seed."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import DataLoader

from toolkit.errors import DataError


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a worker from torch's per-worker seed
    (torch sets it to the loader's base seed + worker id)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch installs
        pass


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    sampler: Any = None,
) -> DataLoader:
    """A ``DataLoader`` that repeats exactly for a given ``seed``.

    Shuffling uses a ``torch.Generator`` seeded with ``seed`` (also the source of the
    workers' base seed); each worker seeds ``random`` / NumPy from its torch seed.
    ``workers > 0`` keeps the workers alive across epochs. With a ``sampler`` (e.g. a
    ``DistributedSampler``) ``shuffle`` is left to the sampler.
    """
    if int(batch_size) < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if int(workers) < 0:
        raise DataError(f"--workers must be 0 or more, got {workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=_seed_worker, prefetch_factor=4)
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=bool(shuffle) if sampler is None else False,
        sampler=sampler,
        num_workers=int(workers),
        pin_memory=bool(pin_memory),
        drop_last=bool(drop_last),
        generator=generator,
        **kwargs,
    )
