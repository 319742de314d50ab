"""Freezing by layer groups, as one object with its own resumable state (the idea of
Lightning's ``BaseFinetuning``): which groups are frozen at the start (``--freeze``), when
they thaw (``--unfreeze-at``: one more group per epoch, from the output side), applying
that to the parameters and to the optimizer, the train mode that keeps frozen
normalisation layers in eval mode, and the state a checkpoint keeps."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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


class Freezing:
    """The freeze schedule of one run and its current state.

    ``initial`` leading layer groups are frozen at the start; from epoch ``unfreeze_at`` one
    more group thaws per epoch. ``features_only`` means the backbone does not run at all
    (cached features): it counts as fully frozen throughout. The optimizer is built for the
    parameters trainable at epoch 1; :meth:`thaw` adds the parameters of each thawed group
    to it (through ``new_groups``, which turns parameter ids into optimizer groups).
    """

    def __init__(self, backbone: Backbone, initial: int, unfreeze_at: int | None = None, *,
                 features_only: bool = False):
        self.backbone = backbone
        self.n_groups = len(backbone.layer_groups)
        if not 0 <= initial <= self.n_groups:
            raise TkError(f"cannot freeze {initial} of {self.n_groups} layer groups")
        if unfreeze_at and initial == 0:
            raise TkError("--unfreeze-at needs a frozen backbone (--freeze all or N)")
        self.initial, self.unfreeze_at = initial, unfreeze_at
        self.features_only = features_only
        self.frozen = self.planned(1)

    @classmethod
    def from_options(cls, backbone: Backbone, freeze: str | int, unfreeze_at: int | None
                     ) -> Freezing:
        """From ``--freeze all|none|N`` and ``--unfreeze-at``."""
        return cls(backbone, frozen_count(freeze, len(backbone.layer_groups)), unfreeze_at)

    def use_features_only(self) -> None:
        """The backbone will not run (its features are cached): fully frozen throughout."""
        if not self.fully_frozen_throughout:
            raise TkError("cached features need the whole backbone frozen for the whole run")
        self.features_only = True
        self.frozen = self.planned(1)

    @property
    def fully_frozen_throughout(self) -> bool:
        """The whole backbone frozen for the whole run (its features can be cached)."""
        return self.initial == self.n_groups and not self.unfreeze_at

    def planned(self, epoch: int) -> int:
        """How many groups the schedule keeps frozen during ``epoch``."""
        if self.features_only:
            return self.n_groups
        return frozen_at_epoch(self.initial, epoch, self.unfreeze_at)

    def freeze_before_training(self) -> None:
        """Set ``requires_grad`` for epoch 1 (build the optimizer after this)."""
        self.frozen = self.planned(1)
        apply_freeze(self.backbone, self.frozen)

    def thaw(self, epoch: int, optimizer: Any,
             new_groups: Callable[[set[int]], list[dict[str, Any]]]) -> bool:
        """Unfreeze what the schedule says for ``epoch`` and hand the newly trainable
        parameters to ``optimizer``. True when something thawed."""
        target = self.planned(epoch)
        if target >= self.frozen:
            return False
        before = {id(p) for g in optimizer.param_groups for p in g["params"]}
        apply_freeze(self.backbone, target)
        new = {id(p) for p in self.backbone.module.parameters() if p.requires_grad} - before
        for group in new_groups(new):
            optimizer.add_param_group(group)
        self.frozen = target
        return True

    def replay(self, until_epoch: int, optimizer: Any,
               new_groups: Callable[[set[int]], list[dict[str, Any]]]) -> None:
        """Thaw as the run did in epochs 2..``until_epoch`` (on resume, before the
        optimizer's saved state is loaded: its parameter groups then match)."""
        for epoch in range(2, until_epoch + 1):
            self.thaw(epoch, optimizer, new_groups)

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()``, frozen groups' BatchNorm (and a fully frozen backbone) in
        eval mode."""
        set_train_mode(model, self.backbone, self.frozen)

    def describe_thaw(self, before: int) -> str:
        return (f"unfroze backbone layer groups {self.frozen + 1}..{before} "
                f"({self.frozen} of {self.n_groups} still frozen)")

    # -- resumable state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "unfreeze_at": self.unfreeze_at,
                "frozen": self.frozen, "groups": self.n_groups}

    def check_state(self, state: Any, epoch: int) -> None:
        """A checkpoint's freezing state must be this schedule's after ``epoch`` (after
        :meth:`replay`): anything else was made with other settings or edited."""
        expected = self.state_dict()
        if not isinstance(state, dict) or set(state) != set(expected):
            raise TkError("its freezing state is malformed")
        for key in ("initial", "unfreeze_at", "groups"):
            if state[key] != expected[key] or type(state[key]) is not type(expected[key]):
                raise TkError(f"it was made with other freezing settings ({key} "
                              f"{state[key]!r}, now {expected[key]!r})")
        if type(state["frozen"]) is not int or state["frozen"] != self.planned(epoch):
            raise TkError(f"its freezing state (frozen {state['frozen']!r}) does not match "
                          f"the schedule at epoch {epoch}")
