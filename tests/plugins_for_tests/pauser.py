"""A test plugin that holds a run at the end of epoch 1: it creates the file named by
``TK_TEST_PAUSED`` and waits (at most a minute) until the file ``TK_TEST_GO`` exists. Tests
use it to act while a real `tk finetune` is known to be in the middle of its run."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from toolkit.plugin.hookspecs import hookimpl


@hookimpl
def tk_epoch_end(epoch: int, metrics: dict[str, Any]) -> None:
    paused, go = os.environ.get("TK_TEST_PAUSED"), os.environ.get("TK_TEST_GO")
    if epoch != 1 or not paused or not go:
        return
    Path(paused).write_text("paused")
    deadline = time.monotonic() + 60
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
