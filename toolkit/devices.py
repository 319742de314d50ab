"""Device and precision selection, and what tk picks by default for the machine it runs on
(the one place that looks at the hardware):

- :func:`resolve_precision`: ``auto`` is ``bf16-mixed`` where the device computes bf16
  natively (:func:`native_bf16`: CUDA compute capability >= 8.0; a CPU with AVX512-BF16,
  AMX or Arm BF16 instructions), else ``32``;
- :func:`resolve_channels_last`: ``None`` (auto) is on for convolutional models on the CPU
  and CUDA (:func:`is_convolutional`), off for ViT-like ones and elsewhere;
- :func:`train_workers`: DataLoader workers for training, bounded by the usable cores, the
  file-descriptor limit and the available memory.

Every CUDA-only call sits behind a device check."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Any

import torch

from toolkit.env import usable_cpus
from toolkit.errors import TkError

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
AUTO = "auto"
PRECISION_CHOICES = (AUTO, *PRECISIONS)
# CPU flags (/proc/cpuinfo) of instructions that compute bf16 natively: x86 AVX512-BF16 and
# AMX, Arm's BF16 extension. Without them oneDNN emulates bf16 and it is slower than fp32.
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


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


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``flags`` on x86, ``Features`` on Arm);
    empty where /proc/cpuinfo cannot be read (other systems)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (so bf16 autocast is faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return bool(cpu_flags() & _BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16-mixed`` where :func:`native_bf16`, else ``32``; any other value is
    checked against the device (:func:`check_precision`)."""
    if str(precision) == AUTO:
        return "bf16-mixed" if native_bf16(device) else "32"
    return check_precision(precision, device)


def is_convolutional(model: Any) -> bool:
    """Whether ``model`` has a sliding 2-D convolution (kernel > 1, stride < kernel): CNNs
    do, ViT-like models have only a patch embedding (stride = kernel) and linear layers."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            k, s = max(m.kernel_size), max(m.stride)
            if k > 1 and s < k:
                return True
    return False


def resolve_channels_last(channels_last: bool | None, model: Any, device: torch.device) -> bool:
    """``None`` (auto): channels_last for convolutional models on the CPU or CUDA, where it
    is faster (oneDNN / cuDNN NHWC kernels); a given value wins."""
    if channels_last is not None:
        return bool(channels_last)
    return device.type in ("cpu", "cuda") and is_convolutional(model)


def train_workers(world_size: int = 1) -> int:
    """DataLoader workers for training by default: the usable cores (per process under
    torchrun), at most 4, fewer when the file-descriptor limit (each worker holds pipes and
    passes batches as shared-memory descriptors) or the available memory (about 0.5 GB a
    worker) leave less room; none under a file-size limit (``ulimit -f``: the shared-memory
    files that carry the batches are capped by it)."""
    workers = min(4, usable_cpus() // max(1, int(world_size)))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            workers = min(workers, max(0, (int(soft) - 64) // 64))
        # workers hand batches over in shared-memory files, which a file-size limit
        # (ulimit -f) caps too: then decode in the main process
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            workers = 0
    except (ImportError, OSError, ValueError):
        pass
    available = _available_memory()
    if available is not None:
        workers = min(workers, int(available // (512 << 20)))
    return max(0, workers)


def _available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux ``MemAvailable``), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_precision(precision: str, device: torch.device) -> str:
    precision = str(precision)
    if precision not in PRECISIONS:
        raise TkError(f"--precision {precision}: expected one of "
                      f"{', '.join(PRECISION_CHOICES)}")
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
