"""Freezing by layer groups: how many groups are frozen, gradual unfreezing, and the train
mode that keeps frozen normalisation layers in eval mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from toolkit.errors import TkError
from toolkit.model.backbone import Backbone

if TYPE_CHECKING:
    from torch import nn



def frozen_count(freeze: str | int, num_groups: int) -> int:
    """``all`` / ``none`` / ``N`` -> how many leading layer groups are frozen."""
    if isinstance(freeze, str):
        f = freeze.strip().lower()
        if f == "all":
            return num_groups
        if f == "none":
            return 0
        try:
            freeze = int(f)
        except ValueError:
            raise TkError(f"--freeze {freeze}: expected all, none or a number") from None
    if freeze < 0:
        raise TkError(f"--freeze {freeze}: must not be negative")
    if freeze > num_groups:
        raise TkError(f"--freeze {freeze}: this backbone has only {num_groups} layer groups")
    return int(freeze)


def frozen_at_epoch(initial: int, epoch: int, unfreeze_at: int | None) -> int:
    """Gradual unfreezing: from epoch ``unfreeze_at`` on, one more group (from the output
    side) is unfrozen each epoch until none is frozen."""
    if not unfreeze_at or epoch < unfreeze_at:
        return initial
    return max(0, initial - (epoch - unfreeze_at + 1))


def apply_freeze(backbone: Backbone, n_frozen: int) -> None:
    """Freeze the first ``n_frozen`` layer groups (no gradients); unfreeze the rest."""
    for i, group in enumerate(backbone.layer_groups):
        for p in group.parameters():
            p.requires_grad_(i >= n_frozen)


def set_train_mode(model: nn.Module, backbone: Backbone, n_frozen: int) -> None:
    """``model.train()`` except the normalisation layers of frozen groups, which stay in
    eval mode so their running statistics keep their pretrained values."""
    from torch import nn

    model.train()
    for group in backbone.layer_groups[:n_frozen]:
        for m in group.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    if n_frozen == len(backbone.layer_groups):
        backbone.module.eval()  # fully frozen: dropout in the backbone off too
