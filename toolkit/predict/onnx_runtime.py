"""The ONNX Runtime runtime: an exported ``.onnx`` file (``tk export``) behind
:class:`toolkit.predict.runtime.Runtime`, without torch.

The graph ``tk export`` writes takes the very ``uint8`` crops the decoding workers make
(the host half of the eval transform), only in ``NCHW`` order: the ``/ 255`` and the
mean / std normalisation are inside the graph. So a batch is one transpose and one
``InferenceSession.run``; nothing here imports torch, torchvision or timm (the metadata
is read by :mod:`toolkit.predict.export.artifact`, which does not either).

Execution providers: ``device="auto"`` takes CUDA when this onnxruntime has it (the
``onnxruntime-gpu`` package), else the CPU; ``cpu`` the CPU; ``cuda`` / ``cuda:N`` CUDA
(one line when it is missing). Intra-op threads: the CPU cores this process may use
(``sched_getaffinity``, so ``taskset`` and cgroup CPU sets are respected; ONNX Runtime's
own default counts every physical core of the machine), and the threads sleep between
batches instead of spinning, so they do not take the cores from the decoding workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError

if TYPE_CHECKING:
    import numpy as np

    from toolkit.predict.export.artifact import ExportInfo

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def providers_for(device: str, available: Sequence[str]) -> tuple[list[Any], str]:
    """``(providers, description)`` for ONNX Runtime from tk's ``--device`` value.
    ``available``: ``onnxruntime.get_available_providers()``."""
    dev = str(device or "auto").strip().lower()
    if dev == "auto":
        dev = "cuda" if CUDA in available else "cpu"
    if dev == "cpu":
        return [CPU], "cpu"
    if dev == "cuda" or dev.startswith("cuda:"):
        index = dev.partition(":")[2] or "0"
        if not index.isdigit():
            raise TkError(f"--device {device}: expected cuda or cuda:N")
        if CUDA not in available:
            raise TkError(f"--device {device}: this onnxruntime has no CUDA execution provider "
                          "(install onnxruntime-gpu in place of onnxruntime, or use "
                          "--device cpu)")
        return [(CUDA, {"device_id": int(index)}), CPU], f"cuda:{index}"
    raise TkError(f"--device {device}: the onnx runtime runs on cpu or cuda[:N]")


class OnnxRuntime:
    """An ONNX Runtime session over an exported file, fed ``uint8`` NHWC crops.

    ``session``/``info``: from :func:`toolkit.predict.export.artifact.open_onnx_session`
    (or use :meth:`open`)."""

    name = "onnx"
    accepts_jpeg = False

    def __init__(self, session: Any, info: ExportInfo, device: str = "cpu"):
        self.session = session
        self.info = info
        self.device = device
        self.input_name = session.get_inputs()[0].name
        self.output_name = info.output_name
        self.crop_size = info.crop_size
        names = [o.name for o in session.get_outputs()]
        if self.output_name not in names:
            self.output_name = names[0]

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, device: str = "auto",
             threads: int | None = None) -> OnnxRuntime:
        """Open an exported ``.onnx`` file on ``device`` (see the module doc); one-line
        :class:`~toolkit.errors.TkError` for a file that is not a usable tk export and for
        a missing ``[onnx]`` extra."""
        from toolkit.predict.export.artifact import (
            ExportFileError,
            missing_extra,
            open_onnx_session,
            read_export,
        )

        info = read_export(path)  # the metadata first: a bad file fails without onnxruntime
        if info.format != "onnx":
            raise ExportFileError(f"{path}: a {info.format} export, which runs in PyTorch; "
                                  "`tk infer --model` takes an ONNX export "
                                  "(`tk export MODEL --format onnx`) or a stored model name")
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_extra("--model FILE.onnx") from None
        providers, where = providers_for(device, ort.get_available_providers())
        session, info = open_onnx_session(path, providers=providers,
                                          threads=threads or usable_cores(),
                                          spinning=False)
        return cls(session, info, where)

    # -- the Runtime interface -----------------------------------------------------------
    def start(self, crops: np.ndarray | None, jpegs: Sequence[bytes] = ()) -> Any:
        """Runs the batch now (ONNX Runtime's ``run`` is synchronous; the decoding
        workers prepare the next batches meanwhile)."""
        import numpy as np

        if jpegs:
            raise TkError("the onnx runtime takes decoded crops, not JPEG bytes")
        if crops is None or not len(crops):
            return np.zeros((0, len(self.info.classes)), dtype=np.float32)
        if crops.shape[1:3] != self.crop_size:
            raise TkError(f"crops of {crops.shape[1]}x{crops.shape[2]} for a model that takes "
                          f"{self.crop_size[0]}x{self.crop_size[1]}")
        x = np.ascontiguousarray(crops.transpose(0, 3, 1, 2))  # NHWC -> NCHW, uint8
        try:
            (logits,) = self.session.run([self.output_name], {self.input_name: x})
        except Exception as exc:  # onnxruntime's own exception types
            first = " ".join(str(exc).split())[:300]
            raise TkError(f"onnxruntime failed on a batch of {len(x)} images: {first}"
                          ) from None
        return np.asarray(logits, dtype=np.float32)

    def finish(self, handle: Any) -> tuple[np.ndarray, list[str | None]]:
        return handle, []

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """``float32`` logits of ``uint8 [N, H, W, 3]`` crops (the host half of the eval
        transform), in one call."""
        return self.finish(self.start(crops))[0]

    def __repr__(self) -> str:
        return f"OnnxRuntime({self.info.path}, {self.info.precision}, {self.device})"
