"""A training journal: an observer of tk's lifecycle hooks, two ways.

- As a plugin-wide observer: when ``TK_TEXTURES_JOURNAL=FILE`` is set, every training
  start, epoch end, saved model and run end is appended to FILE as one JSON object per
  line. Without it the observer does nothing.
- As a logger (``tk finetune --log journal``): :class:`JournalLogger` writes the same lines
  to ``journal.jsonl`` in the run's log folder, for the runs that ask for it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from toolkit.plugin.hookspecs import hookimpl

ENV = "TK_TEXTURES_JOURNAL"


def record(event: str, **fields: Any) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "time": time.time(), **fields}, default=str)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class JournalLogger:
    """What ``--log journal`` attaches for one run: its methods are observer hooks."""

    def __init__(self, log_dir: str, run_name: str):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(log_dir) / "journal.jsonl"
        self.run_name = run_name

    def _write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "run": self.run_name, **fields}, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    @hookimpl
    def tk_train_start(self, config: dict[str, Any]) -> None:
        self._write("train_start", epochs=config.get("epochs"))

    @hookimpl
    def tk_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self._write("epoch_end", epoch=epoch, val_acc=metrics["val_acc"])

    @hookimpl
    def tk_model_saved(self, name: str, artifacts: dict[str, str]) -> None:
        self._write("model_saved", name=name, artifacts=sorted(artifacts))

    @hookimpl
    def tk_train_end(self, status: str) -> None:
        self._write("train_end", status=status)
