"""Turning a loaded model into the bytes of an exported file, and running those bytes.

Every format wraps the model in :class:`UInt8Input` (``uint8 [N,3,H,W]`` RGB crops ->
``float / 255`` -> ``(x - mean) / std`` -> logits, the operations of the eval transform in
its order) with a dynamic batch dimension, and carries the tk metadata
(:func:`toolkit.predict.export.artifact.build_metadata`):

- ``onnx``: ``torch.onnx.export(..., dynamo=True)``; metadata in ``metadata_props``;
- int8 ONNX: ONNX Runtime static quantization of the fp32 graph (QDQ, per-channel int8
  weights, uint8 activations, MinMax calibration) after ``quant_pre_process``;
- ``pt2``: ``torch.export.export`` + ``torch.export.save``; metadata in ``extra/tk.json``;
- ``torchscript``: ``torch.jit.trace`` + ``torch.jit.save``; metadata in ``extra/tk.json``.

Each ``*_runner`` loads the bytes the way a user would and returns a function
``uint8 crops -> float32 logits`` for the parity check.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError
from toolkit.predict.export.artifact import INPUT_NAME, OUTPUT_NAME, ZIP_META_NAME

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

Runner = Callable[["np.ndarray"], "np.ndarray"]
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for one ONNX file (no external data here)


class ExportError(TkError):
    """The model could not be exported, or the export does not match the eager model:
    nothing was written."""

    exit_code = 1


def uint8_module(model: nn.Module, mean: Iterable[float], std: Iterable[float]) -> nn.Module:
    """``model`` behind :class:`UInt8Input` (built here so torch loads on use)."""
    import torch
    from torch import nn

    class UInt8Input(nn.Module):
        """``uint8 [N,3,H,W]`` RGB crops -> logits, the normalisation in the graph."""

        def __init__(self, model: nn.Module, mean: Iterable[float], std: Iterable[float]):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32)
                                 .view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32)
                                 .view(1, 3, 1, 1))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.float() / 255
            return self.model((x - self.mean) / self.std)

    return UInt8Input(model, mean, std).eval()


def _example(h: int, w: int) -> torch.Tensor:
    import torch

    return torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def why(exc: BaseException) -> str:
    """One line for an exporter's exception: its innermost cause, ANSI colours removed."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__  # type: ignore[assignment]
    inner = seen[-1]
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(inner))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(inner).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the exporters' chatter (warnings, torch's log records, the partial graphs
    torch.export prints on failure) off stderr: tk reports the outcome in one line."""
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)


# -- ONNX ------------------------------------------------------------------------------------
def onnx_proto(module: nn.Module, h: int, w: int) -> Any:
    """The fp32 ``onnx.ModelProto`` of ``module`` (:func:`uint8_module`), batch dynamic."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    try:
        with quiet():
            program = torch.onnx.export(
                module, (_example(h, w),), dynamo=True, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many types; any of them means no file
        raise ExportError(f"torch.onnx.export failed ({why(exc)}); nothing written") from exc
    return program.model_proto


def onnx_bytes(proto: Any, props: Mapping[str, str], doc: str = "") -> bytes:
    """``proto`` with ``props`` as its ``metadata_props`` (replacing any tk ones),
    checked by ``onnx.checker`` and serialised."""
    import onnx

    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    if doc:
        proto.doc_string = doc
    if proto.ByteSize() > MAX_PROTO_BYTES:
        raise ExportError(f"the ONNX model is {proto.ByteSize() / 1e9:.1f} GB, over the 2 GB a "
                          "single ONNX file holds (tk export writes no external data); "
                          "nothing written")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejects the exported model ({why(exc)}); "
                          "nothing written") from exc
    return proto.SerializeToString()


def onnx_runner(data: bytes) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda crops: session.run([OUTPUT_NAME], {INPUT_NAME: crops})[0]


def quantize_int8(fp32: bytes, calibration: Iterable[np.ndarray]) -> Any:
    """The int8 ``onnx.ModelProto`` of the fp32 ONNX bytes: ONNX Runtime static
    quantization (QDQ, per-channel int8 weights, uint8 activations), calibrated (MinMax) on
    the ``uint8 [N,3,H,W]`` batches of ``calibration``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="tk-export-") as tmp:
        src, pre, out = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        with open(src, "wb") as fh:
            fh.write(fp32)
        try:
            with quiet():
                quant_pre_process(src, pre)
                quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8)
        except Exception as exc:  # onnxruntime's quantizer raises assorted types
            raise ExportError(f"int8 quantization failed ({why(exc)}); nothing written") from exc
        return onnx.load(out)


# -- PyTorch formats -------------------------------------------------------------------------
def pt2_program(module: nn.Module, h: int, w: int) -> Any:
    """The ``torch.export`` program of ``module`` (batch dynamic)."""
    import torch

    try:
        with quiet():
            return torch.export.export(
                module, (_example(h, w),),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as exc:
        raise ExportError(f"torch.export failed ({why(exc)}); nothing written") from exc


def pt2_bytes(program: Any, props: Mapping[str, str]) -> bytes:
    """``program`` saved by ``torch.export.save`` with ``props`` in ``extra/tk.json``."""
    import torch

    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={ZIP_META_NAME: json.dumps(dict(props))})
    return buf.getvalue()


def pt2_runner(data: bytes) -> Runner:
    import torch

    program = torch.export.load(io.BytesIO(data))
    module = program.module()
    return _torch_runner(module)


def torchscript_module(module: nn.Module, h: int, w: int) -> Any:
    """``torch.jit.trace`` of ``module`` (TorchScript is deprecated upstream in favour of
    ``torch.export``; its warnings are not repeated here)."""
    import torch

    try:
        with quiet():
            return torch.jit.trace(module, _example(h, w), check_trace=False)
    except Exception as exc:
        raise ExportError(f"torch.jit.trace failed ({why(exc)}); nothing written") from exc


def torchscript_bytes(traced: Any, props: Mapping[str, str]) -> bytes:
    """``traced`` saved by ``torch.jit.save`` with ``props`` in ``extra/tk.json``."""
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(traced, buf, _extra_files={ZIP_META_NAME: json.dumps(dict(props))})
    return buf.getvalue()


def torchscript_runner(data: bytes) -> Runner:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return _torch_runner(module)


def _torch_runner(module: Any) -> Runner:
    import torch

    def run(crops: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(crops)).float().numpy()

    return run
