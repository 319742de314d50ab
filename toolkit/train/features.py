"""Frozen-backbone feature caching: compute the backbone's features once, train the head on
them. The cache is keyed by the backbone's weights, the data and the transform, kept as
safetensors under the store (``cache/features``), and announced on stderr when used or
invalidated."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from toolkit import distributed as D
from toolkit.data.loader import make_loader
from toolkit.devices import autocast, pin_memory, to_device
from toolkit.errors import StoreError, TkError

INDEX = "index.json"


def should_cache(flag: bool | None, fully_frozen: bool, augment: bool,
                 unfreeze_at: int | None) -> bool:
    """``--cache-features`` forces it (needs a fully frozen backbone), ``--no-cache-features``
    turns it off; by default it is on when the backbone is fully frozen for the whole run and
    no augmentation changes the backbone's input."""
    if flag is False:
        return False
    frozen_throughout = fully_frozen and not unfreeze_at
    if flag is True and not frozen_throughout:
        raise TkError("--cache-features needs the whole backbone frozen for the whole run "
                      "(--freeze all, no --unfreeze-at)")
    return frozen_throughout and (flag is True or not augment)


def state_hash(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's tensors."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_fingerprint(dataset: Any) -> Any:
    """Paths, sizes and modification times of a file-backed dataset (None otherwise)."""
    samples = getattr(dataset, "samples", None)
    if not samples:
        return None
    h = hashlib.sha256()
    for path, label in samples:
        try:
            st = os.stat(path)
            h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}|{label}|missing\n".encode())
    return h.hexdigest()


@torch.inference_mode()
def compute_features(module: torch.nn.Module, dataset: Any, *, device: torch.device,
                     precision: str, batch_size: int, workers: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, workers=workers,
                         pin_memory=pin_memory(device))
    feats, labels = [], []
    for x, y in loader:
        with autocast(device, precision):
            f = module(to_device(x, device))
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y).long().cpu())
    if not feats:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def cached_features(
    backbone: Any,
    data_config: Any,
    datasets: tuple[Any, Any],
    *,
    key_parts: dict[str, Any],
    cache_dir: Path,
    device: torch.device,
    precision: str,
    batch_size: int,
    workers: int,
    dist: D.DistInfo,
    log: Callable[[str], None],
) -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """(train, val) TensorDatasets of backbone features, from the cache or computed now."""
    train, val = datasets
    weights = state_hash(backbone.module)
    key_doc = {
        "weights": weights,
        "data_config": data_config.to_dict(),
        "data": key_parts,
        "train": [len(train), dataset_fingerprint(train)],
        "val": [len(val), dataset_fingerprint(val)],
        "precision": precision,
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()
    slot = f"{backbone.name}|{key_parts.get('dataset')}"
    path = cache_dir / f"{key}.safetensors"

    tensors = None
    if dist.is_main:
        tensors = _read(path)
        if tensors is not None:
            log(f"feature cache: using {path.name[:16]}... ({len(train)} train / {len(val)} "
                "val feature vectors; the backbone is not run)")
        else:
            old = _index(cache_dir).get(slot)
            if old and old != key:
                log("feature cache: invalidated (backbone weights, data or transform changed);"
                    " recomputing")
                (cache_dir / f"{old}.safetensors").unlink(missing_ok=True)
    hit = D.broadcast_object(tensors is not None)
    if hit:
        if dist.enabled:
            tensors = D.broadcast_object(tensors)
    else:
        # every rank runs the backbone over its own share of the images; the shares are
        # gathered back into input order on every rank
        t0 = time.perf_counter()
        backbone.module.to(device)
        parts = {}
        for split, dataset in (("train", train), ("val", val)):
            share = torch.utils.data.Subset(
                dataset, range(dist.rank, len(dataset), dist.world_size))
            x, y = compute_features(backbone.module, share, device=device,
                                    precision=precision, batch_size=batch_size,
                                    workers=workers)
            parts[f"{split}_x"], parts[f"{split}_y"] = _gather_in_order(x, y, len(dataset),
                                                                        dist)
        tensors = parts
        if dist.is_main:
            stored = _write(path, tensors, cache_dir, slot, key)
            shared = f" over {dist.world_size} processes" if dist.enabled else ""
            log(f"feature cache: computed {len(tensors['train_x']) + len(tensors['val_x'])} "
                f"feature vectors{shared} in {time.perf_counter() - t0:.1f}s"
                + (f", saved to {path}" if stored else " (kept in memory only)"))
    assert tensors is not None
    return (torch.utils.data.TensorDataset(tensors["train_x"], tensors["train_y"]),
            torch.utils.data.TensorDataset(tensors["val_x"], tensors["val_y"]))


def _gather_in_order(x: torch.Tensor, y: torch.Tensor, n: int, dist: D.DistInfo
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r computed samples r, r+world, ...: put every rank's share back in order."""
    if not dist.enabled:
        return x, y
    shares = D.all_gather_object((x, y))
    width = next((sx.shape[1:] for sx, _ in shares if sx.numel()), x.shape[1:])
    full_x = torch.empty((n, *width), dtype=torch.float32)
    full_y = torch.empty(n, dtype=torch.long)
    for rank, (sx, sy) in enumerate(shares):
        if not len(sy):  # more ranks than samples
            continue
        full_x[rank::dist.world_size] = sx
        full_y[rank::dist.world_size] = sy
    return full_x, full_y


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        if {"train_x", "train_y", "val_x", "val_y"} <= set(t):
            return t
    except Exception:
        pass
    path.unlink(missing_ok=True)  # damaged: recompute
    return None


def _index(cache_dir: Path) -> dict[str, str]:
    path = cache_dir / INDEX
    try:
        if path.is_file():
            index = json.loads(path.read_text())
            if isinstance(index, dict):
                return {str(k): str(v) for k, v in index.items()}
    except (OSError, ValueError):
        pass
    return {}


def _write(path: Path, tensors: dict[str, torch.Tensor], cache_dir: Path, slot: str,
           key: str) -> bool:
    """Write the cache entry, then its index, through the store's atomic writer; False
    (features kept in memory only) when the disk refuses (full, file-size limit,
    read-only), with no temp file left. Dead writers' temp files go after a success."""
    from model_store.atomic import atomic_write, clean_stale_temps
    from model_store.fileformat import serialize

    try:
        atomic_write(path, [serialize(tensors)], "feature cache")
        index = _index(cache_dir)
        index[slot] = key
        atomic_write(cache_dir / INDEX, [json.dumps(index, indent=1).encode()],
                     "feature cache index")
    except StoreError:
        return False
    clean_stale_temps(cache_dir)
    return True
