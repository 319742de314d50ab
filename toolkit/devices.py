"""Device and precision selection. Every CUDA-only call sits behind a device check."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from toolkit.errors import TkError

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> the GPU when there is one (CUDA, then MPS), else the CPU."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise TkError("--device mps: MPS is not available on this machine (use --device cpu)")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TkError(f"--device {spec}: no CUDA GPU is available here (use --device cpu "
                          "or --device auto)")
        index = torch.cuda.current_device()
        if ":" in spec:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise TkError(f"--device {spec}: expected cuda:N") from None
            if not 0 <= index < torch.cuda.device_count():
                raise TkError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", index)
    raise TkError(f"--device {spec}: expected auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def check_precision(precision: str, device: torch.device) -> str:
    precision = str(precision)
    if precision not in PRECISIONS:
        raise TkError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "16-mixed" and device.type == "cpu":
        raise TkError("--precision 16-mixed needs a GPU; on the CPU use bf16-mixed or 32")
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TkError("--precision bf16-mixed: this GPU has no bf16 support; use 16-mixed")
    return precision


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context for ``precision`` (a no-op for 32-bit)."""
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> Any:
    """A GradScaler for fp16 (enabled only then; bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")


def pin_memory(device: torch.device) -> bool:
    return device.type == "cuda"


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Copy a tensor (non-blocking from pinned memory on GPU)."""
    non_blocking = device.type == "cuda"
    if channels_last and batch.dim() == 4:
        return batch.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
    return batch.to(device, non_blocking=non_blocking)
