"""The end of `tk finetune`: fit the calibration temperature on the validation split.

The best epoch's weights are run once more over the validation split (rank 0 alone, the
eval transform, or the head alone over cached features), the temperature minimising the
NLL is fitted (:func:`toolkit.calibration.fit_temperature`), and the record goes into the
model's metadata as ``meta["calibration"]``; :mod:`toolkit.predict.scoring` uses it for
every score tk writes. The ECE before and after is measured on the same split (in-sample:
`tk review` measures it on held-out images)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn


def validation_logits(net: nn.Module, val_set: Any, *, device: torch.device, precision: str,
                      batch_size: int, channels_last: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [N, C] float32, labels [N])`` of ``net`` over ``val_set``, in order."""
    import numpy as np
    import torch

    from toolkit.data.loader import make_loader
    from toolkit.devices import autocast, to_device

    loader = make_loader(val_set, batch_size, shuffle=False, workers=0)
    was_training = net.training
    net.eval()
    out, labels = [], []
    try:
        with torch.inference_mode():
            for x, y in loader:
                x = to_device(x, device, channels_last)
                with autocast(device, precision):
                    logits = net(x)
                out.append(logits.float().cpu().numpy())
                labels.append(np.asarray(y))
    finally:
        net.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(out), np.concatenate(labels).astype(np.int64)


def calibrate(net: nn.Module, val_set: Any, *, device: torch.device, precision: str,
              batch_size: int, channels_last: bool = False) -> dict[str, Any] | None:
    """The ``meta["calibration"]`` record of ``net`` on ``val_set`` (see
    :func:`toolkit.calibration.calibration_record`); None when the split is empty or its
    labels are not class indices (a dataset plugin's soft or multi-hot targets)."""
    from toolkit.calibration import calibration_record

    logits, labels = validation_logits(net, val_set, device=device, precision=precision,
                                       batch_size=batch_size, channels_last=channels_last)
    if not len(labels) or labels.ndim != 1 or logits.ndim != 2:
        return None
    record = calibration_record(logits, labels)
    record["split"] = "validation"
    return record
