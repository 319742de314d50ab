"""``cosine``: a cosine-similarity classifier head.

logits = scale * cos(angle between the feature vector and each class's weight vector).
Bounded logits make it forgiving with few samples per class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from toolkit.errors import TkError


class CosineHead(nn.Module):
    def __init__(self, num_features: int, num_classes: int, scale: float = 16.0,
                 learn_scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, num_features))
        nn.init.normal_(self.weight, std=0.01)
        log_scale = torch.tensor(float(scale)).log()
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()
        return cos * self.log_scale.exp()


def cosine_head(num_features: int, num_classes: int, scale: float = 16.0,
                learn_scale: bool = True) -> Any:
    if float(scale) <= 0:
        raise TkError(f"head 'cosine': scale must be positive, got {scale}")
    return CosineHead(num_features, num_classes, float(scale), bool(learn_scale))
