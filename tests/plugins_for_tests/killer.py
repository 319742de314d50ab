"""A test plugin that kills its own process (SIGKILL, like `kill -9`) at the end of epoch
``TK_TEST_KILL_AT``, before that epoch's checkpoint is written: a deterministic crash."""

from __future__ import annotations

import os
import signal
from typing import Any

from toolkit.plugin.hookspecs import hookimpl


@hookimpl
def tk_epoch_end(epoch: int, metrics: dict[str, Any]) -> None:
    at = os.environ.get("TK_TEST_KILL_AT")
    if at and epoch == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
