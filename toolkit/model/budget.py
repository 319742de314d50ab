"""How big a component may be, checked while it is built: every parameter and buffer a
module registers is counted (torch's global registration hooks), and the build stops with
one clear line once the total passes the limit. Run on torch's meta device first
(:func:`check_on_meta`) this costs no memory, so ``--opt head.layers=100000000`` or a
backbone width of a million is refused before anything is allocated.

Limits: ``TK_MAX_MODEL_BYTES`` (default: an eighth of this machine's memory, since training
needs several times the weights' size: gradients, optimizer state) for the bytes of all
parameters and buffers, and :data:`MAX_TENSORS` registered tensors (real networks have a
few thousand; the count also bounds the Python objects a runaway loop creates)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from toolkit.errors import TkError

MAX_TENSORS = 50_000


class ModelTooLargeError(TkError):
    """A component would exceed the size limit."""


def default_limit_bytes() -> int:
    """``TK_MAX_MODEL_BYTES``, else an eighth of the physical memory (4 GiB if unknown)."""
    from toolkit import env

    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 32 << 30
    return env.integer("TK_MAX_MODEL_BYTES", physical // 8, minimum=1)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class Budget:
    """Running totals over one or more component builds (see :meth:`building`)."""

    def __init__(self, limit_bytes: int | None = None, max_tensors: int = MAX_TENSORS):
        self.limit = default_limit_bytes() if limit_bytes is None else limit_bytes
        self.max_tensors = max_tensors
        self.bytes = 0
        self.tensors = 0

    @contextlib.contextmanager
    def building(self, what: str) -> Iterator[None]:
        """Count what modules register while the block runs; ``what`` names the
        component in the error (``"head 'heads:mlp' (layers=100000000)"``)."""
        from torch.nn.modules import module as torch_module

        def count(_module: Any, _name: str, tensor: Any) -> None:
            if tensor is None:
                return
            self.tensors += 1
            self.bytes += tensor.numel() * tensor.element_size()
            if self.bytes > self.limit:
                raise ModelTooLargeError(
                    f"{what} is too large: its parameters and buffers pass "
                    f"{_human(self.limit)}, the limit (an eighth of this machine's memory: "
                    "training needs several times the weights' size; TK_MAX_MODEL_BYTES "
                    "sets another)")
            if self.tensors > self.max_tensors:
                raise ModelTooLargeError(
                    f"{what} is too large: it registers more than {self.max_tensors} "
                    "parameter and buffer tensors")

        handles = [torch_module.register_module_parameter_registration_hook(count),
                   torch_module.register_module_buffer_registration_hook(count)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def check_on_meta(build: Callable[[Budget], Any], limit_bytes: int | None = None) -> None:
    """Run ``build(budget)`` on torch's meta device (shapes only: no memory, no
    initialisation, no random numbers drawn); it wraps each component it builds in
    ``budget.building(...)``. A size error propagates; any other failure is left for the
    real build to report (some factories cannot run on the meta device)."""
    import torch

    budget = Budget(limit_bytes)
    try:
        with torch.device("meta"):
            build(budget)
    except ModelTooLargeError:
        raise
    except Exception:  # noqa: BLE001 - the real build reports it
        return
