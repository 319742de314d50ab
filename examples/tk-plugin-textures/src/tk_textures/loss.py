"""``poly1``: Poly-1 cross-entropy (Leng et al., 2022, "PolyLoss").

loss = CE + epsilon * (1 - p_target), averaged over the batch. ``epsilon=0`` is plain
cross-entropy; a positive epsilon keeps pushing already-right predictions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from toolkit.errors import TkError


class Poly1Loss(nn.Module):
    def __init__(self, epsilon: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.epsilon = float(epsilon)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, targets, reduction="none",
                             label_smoothing=self.label_smoothing)
        p_target = logits.softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
        return (ce + self.epsilon * (1.0 - p_target)).mean()


def poly1_loss(epsilon: float = 1.0, label_smoothing: float = 0.0) -> Any:
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise TkError("loss 'poly1': label_smoothing must be in [0, 1)")
    return Poly1Loss(epsilon, label_smoothing)
