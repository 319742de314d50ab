"""The torch runtime: a stored model (``nn.Module``) on a device, behind
:class:`toolkit.predict.runtime.Runtime`.

A batch of ``uint8`` crops goes to the device (from pinned memory, non-blocking, on CUDA),
is normalised there (the device half of the eval transform:
:meth:`toolkit.data.transforms.EvalTransform.normalize`, a quarter of the bytes of float
tensors cross the bus), and runs through the model under ``torch.inference_mode`` and
autocast (``precision``), optionally in channels-last layout. On CUDA the logits are
copied back into pinned memory without blocking: :meth:`TorchRuntime.start` returns while
the GPU works, :meth:`TorchRuntime.finish` waits.

With ``tta`` (``--tta``) every batch also runs mirrored left to right, and the two
predictions are averaged as probabilities (softmax, or sigmoid per class for a multi-label
model); the logits handed back are those of the mean probabilities (``log p`` for softmax,
``log(p / (1 - p))`` for sigmoid), so scoring stays as it is. Twice the model time.

JPEG bytes (``--decode torchvision``) are decoded with ``torchvision.io.decode_jpeg`` on the
model's device (nvJPEG, batched, on CUDA) and cropped there
(:meth:`~toolkit.data.transforms.EvalTransform.crop_tensor`); a JPEG the device cannot
decode falls back to Pillow, then to an error for that file alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from toolkit.data.transforms import EvalTransform


def tta_logits(views: list[torch.Tensor], multi_label: bool) -> torch.Tensor:
    """Logits whose probabilities are the mean of the ``views``' probabilities."""
    import torch

    if multi_label:
        p = torch.stack([torch.sigmoid(v) for v in views]).mean(0).clamp(1e-7, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)
    return torch.stack([torch.log_softmax(v, dim=1) for v in views]).exp().mean(0).clamp(
        min=1e-30).log()


class TorchRuntime:
    """``model`` (moved to ``device`` in place, eval mode) with the eval ``transform``."""

    name = "torch"

    def __init__(self, model: nn.Module, transform: EvalTransform, *,
                 device: str | torch.device = "auto", precision: str = "32",
                 channels_last: bool | None = None, jpeg: bool = False, tta: bool = False,
                 multi_label: bool = False):
        import torch

        from toolkit.devices import check_precision, resolve_channels_last, resolve_device

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.precision = check_precision(precision, self.device)
        self.channels_last = resolve_channels_last(channels_last, model, self.device)
        self.transform = transform
        self.accepts_jpeg = bool(jpeg)
        self.tta, self.multi_label = bool(tta), bool(multi_label)
        self.cuda = self.device.type == "cuda"
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()

    # -- the Runtime interface -----------------------------------------------------------
    def start(self, crops: np.ndarray | None, jpegs: Sequence[bytes] = ()) -> Any:
        import torch

        parts: list[torch.Tensor] = []
        if crops is not None and len(crops):
            host = torch.from_numpy(crops)
            if self.cuda:
                host = host.pin_memory()
            x = host.to(self.device, non_blocking=self.cuda).permute(0, 3, 1, 2)
            parts.append(x)  # NCHW view of NHWC memory: channels-last for free
        errors: list[str | None] = []
        if jpegs:
            decoded, errors = self._decode_jpegs(jpegs)
            parts += decoded
        if not parts:
            return None, errors
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last
                         else torch.contiguous_format)
        logits = self.forward(self.transform.normalize(x))
        if not self.cuda:
            return logits, errors
        out = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
        out.copy_(logits, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return (out, done), errors

    def finish(self, handle: Any) -> tuple[np.ndarray, list[str | None]]:
        import numpy as np

        result, errors = handle
        if result is None:
            return np.zeros((len(errors), 0), dtype=np.float32), errors
        if self.cuda:
            out, done = result
            done.synchronize()
            return out.numpy(), errors
        return result.numpy(), errors

    # -- tensors -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (``float32``, on the device) of normalised images ``[N,3,H,W]``."""
        import torch

        from toolkit.devices import autocast

        with torch.inference_mode(), autocast(self.device, self.precision):
            logits = self.model(x)
            flipped = self.model(x.flip(3)) if self.tta else None
        with torch.inference_mode():
            if flipped is None:
                return logits.float()
            return tta_logits([logits.float(), flipped.float()], self.multi_label)

    def logits(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Logits of images already preprocessed with the full eval transform
        (``float [N,3,H,W]``), in batches."""
        import numpy as np

        from toolkit.devices import to_device

        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise TkError(f"expected images [N,3,H,W], got shape {tuple(images.shape)}")
        out = [self.forward(to_device(images[i:i + batch_size].float(), self.device,
                                      self.channels_last)).cpu().numpy()
               for i in range(0, images.shape[0], batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    # -- device decoding -----------------------------------------------------------------
    def _decode_jpegs(self, jpegs: Sequence[bytes]) -> tuple[list[torch.Tensor],
                                                             list[str | None]]:
        """Crops (``uint8 [1,3,H,W]`` on the device) of the JPEGs that decode, and one
        error (or ``None``) per JPEG. Failed JPEGs get a zero crop so positions hold."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        try:
            decoded: list[Any] = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
        except Exception:
            decoded = [None] * len(raw)
        crops: list[torch.Tensor] = []
        errors: list[str | None] = []
        h, w = self.transform.crop_size
        for data, img in zip(raw, decoded, strict=True):
            try:
                if img is None:  # the batch failed: this one alone, then Pillow
                    try:
                        img = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                    except Exception:
                        img = self._pil_crop(bytes(data.numpy()))
                        crops.append(img[None])
                        errors.append(None)
                        continue
                crops.append(self.transform.crop_tensor(img)[None])
                errors.append(None)
            except TkError as exc:
                crops.append(torch.zeros((1, 3, h, w), dtype=torch.uint8, device=self.device))
                errors.append(getattr(exc, "reason", None) or str(exc))
            except Exception as exc:
                crops.append(torch.zeros((1, 3, h, w), dtype=torch.uint8, device=self.device))
                errors.append(f"cannot decode: {type(exc).__name__}: {exc}")
        return crops, errors

    def _pil_crop(self, data: bytes) -> torch.Tensor:
        import torch

        from toolkit.data.decode import load_image

        arr = self.transform.crop(load_image(data))
        return torch.from_numpy(arr).permute(2, 0, 1).to(self.device)
