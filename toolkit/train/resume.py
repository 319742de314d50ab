"""Resuming a run: what a training checkpoint holds (:func:`pack`), reading it back with its
format and the run's identity checked (:func:`read`), and restoring model, progress,
freezing, optimizer and grad scaler from it with every part validated first
(:func:`restore`). A checkpoint that is damaged, edited or from another run is one
:class:`~toolkit.errors.TkError` line; nothing is trusted on its word."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.errors import TkError
from toolkit.model.freezing import Freezing
from toolkit.train.checkpoint import load_checkpoint
from toolkit.train.progress import Progress

CHECKPOINT_FORMAT = 2
CHECKPOINT_KEYS = {"format", "run", "state", "freezing", "model", "best", "optimizer",
                   "scaler"}
OPTIONAL_KEYS = {"ema"}  # only with --ema (the run identity says whether it must be there)
# which part of a run's identity a key belongs to (for the message when a resume differs)
IDENTITY = {"classes": "other classes", "backbone": "another model",
            "backbone_options": "another model", "head": "another model",
            "head_options": "another model", "input_size": "another model",
            "dataset": "other data", "dataset_options": "other data",
            "val_split": "other data", "seed": "other data"}


def pack(*, identity: dict[str, Any], progress: Progress, freezing: Freezing,
         model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
         ema: nn.Module | None = None) -> dict[str, Any]:
    """The state a checkpoint holds after an epoch (the best weights only where they
    differ from the current ones; the EMA weights and their count with ``--ema``)."""
    current = model.state_dict()
    state, best = progress.to_checkpoint(current)
    extra = {"ema": ema.state_dict()} if ema is not None else {}
    return {
        **extra,
        "format": CHECKPOINT_FORMAT,
        "run": identity,
        "state": state,
        "freezing": freezing.state_dict(),
        "model": current,
        "best": best,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
    }


def read(path: Path | None, identity: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``, its format and identity checked against this run's
    ``identity``: a resume with other data, classes or model is refused here, before
    anything is built or trained."""
    if path is None or not path.exists():
        raise TkError(f"--resume: no checkpoint in {path.parent if path else 'this run'}")
    try:
        saved = load_checkpoint(path)
    except TkError as exc:
        raise TkError(f"--resume: {exc}") from None
    where = f"--resume: the checkpoint {path}"
    if not isinstance(saved, dict) or not CHECKPOINT_KEYS <= set(saved) <= (
            CHECKPOINT_KEYS | OPTIONAL_KEYS):
        raise TkError(f"{where} is not a tk training checkpoint (or an older tk wrote it); "
                      "start again without --resume")
    if saved["format"] != CHECKPOINT_FORMAT:
        raise TkError(f"{where} has format {saved['format']!r}, this tk reads "
                      f"{CHECKPOINT_FORMAT}; start again without --resume")
    old = saved["run"]
    if not isinstance(old, dict):
        raise TkError(f"{where} has no run identity; start again without --resume")
    for key in sorted(set(old) | set(identity)):
        then, now = old.get(key), identity.get(key)
        if then != now:
            what = IDENTITY.get(key, "other training settings")
            raise TkError(f"{where} was made with {what} ({key}: {_short(then)} then, "
                          f"{_short(now)} now); resume with the original command, or start "
                          "again without --resume")
    return saved


def restore(saved: dict[str, Any], *, where: Path | None, model: nn.Module,
            freezing: Freezing, optimizer: torch.optim.Optimizer, scaler: Any,
            new_groups: Callable[[set[int]], list[dict[str, Any]]], epochs: int,
            num_classes: int, monitor: str = "val_acc", ema: nn.Module | None = None
            ) -> Progress:
    """Load ``saved`` into the run: model weights, progress (checked before the freeze
    schedule is replayed, so an absurd epoch never loops), freezing, optimizer, scaler,
    and the EMA's weights with ``--ema``."""
    try:
        _load_model(model, saved["model"])
        progress = Progress.from_checkpoint(saved["state"], saved["best"], model.state_dict(),
                                            epochs=epochs, num_classes=num_classes,
                                            monitor=monitor)
        if ema is not None:
            if "ema" not in saved:
                raise TkError("it has no EMA weights")
            _load_model(ema, saved["ema"])
        freezing.replay(progress.epoch, optimizer, new_groups)
        freezing.check_state(saved["freezing"], progress.epoch)
        _load_optimizer(optimizer, saved["optimizer"])
        _load_scaler(scaler, saved["scaler"])
    except TkError as exc:
        raise TkError(f"--resume: the checkpoint {where}: {exc}; resume with the original "
                      "command, or start again without --resume") from None
    return progress


def _load_model(model: nn.Module, state: Any) -> None:
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise TkError("its model weights are malformed")
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TkError("it was made with other settings (backbone, head, classes or "
                      f"options: {' '.join(str(exc).split())[:200]})") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _load_optimizer(opt: torch.optim.Optimizer, state: Any) -> None:
    """Load a saved optimizer state after checking its structure against ``opt``'s own:
    the same parameter groups with the same kinds of values, per-parameter state made of
    tensors and finite numbers."""
    fresh = opt.state_dict()
    ok = (isinstance(state, dict) and set(state) == {"state", "param_groups"}
          and isinstance(state["param_groups"], list) and isinstance(state["state"], dict)
          and len(state["param_groups"]) == len(fresh["param_groups"]))
    if not ok:
        raise TkError("its optimizer state is malformed or for other parameters")
    for saved_group, group in zip(state["param_groups"], fresh["param_groups"], strict=True):
        if not isinstance(saved_group, dict) or set(saved_group) != set(group):
            raise TkError("its optimizer was another one, or had other options")
        if saved_group["params"] != group["params"]:
            raise TkError("its optimizer covered other parameters")
        for key, value in group.items():
            if key != "params" and not _same_kind(saved_group[key], value):
                raise TkError(f"its optimizer setting {key!r} is {_short(saved_group[key])}")
    params = {i for g in fresh["param_groups"] for i in g["params"]}
    for index, entry in state["state"].items():
        if index not in params or not isinstance(entry, dict):
            raise TkError("its optimizer state is for other parameters")
        for key, value in entry.items():
            if not (isinstance(key, str) and (_finite_number(value) or (
                    isinstance(value, torch.Tensor) and bool(torch.isfinite(value).all())))):
                raise TkError(f"its optimizer state {key!r} is not a finite number or tensor")
    try:
        opt.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise TkError(f"its optimizer state does not load ({' '.join(str(exc).split())[:200]})"
                      ) from None


def _finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _same_kind(saved: Any, fresh: Any) -> bool:
    if isinstance(fresh, bool) or fresh is None or isinstance(fresh, str):
        return type(saved) is type(fresh) and (not isinstance(fresh, str) or saved == fresh)
    if isinstance(fresh, (int, float)):
        return _finite_number(saved)
    if isinstance(fresh, (tuple, list)):
        return (isinstance(saved, (tuple, list)) and len(saved) == len(fresh)
                and all(_same_kind(s, f) for s, f in zip(saved, fresh, strict=True)))
    if isinstance(fresh, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.shape == fresh.shape
    return type(saved) is type(fresh)


def _load_scaler(scaler: Any, state: Any) -> None:
    if not isinstance(state, dict):
        raise TkError("its grad-scaler state is malformed")
    if not scaler.is_enabled() or not state:
        return
    if not all(isinstance(k, str) and _finite_number(v) and v >= 0 for k, v in state.items()):
        raise TkError("its grad-scaler state is not finite non-negative numbers")
    try:
        scaler.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise TkError(f"its grad-scaler state does not load ({exc})") from None
