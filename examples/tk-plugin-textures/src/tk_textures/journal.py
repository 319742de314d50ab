"""A training journal: an observer of tk's lifecycle hooks.

When ``TK_TEXTURES_JOURNAL=FILE`` is set, every training start, epoch end and saved model
is appended to FILE as one JSON object per line. Without it the observer does nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

ENV = "TK_TEXTURES_JOURNAL"


def record(event: str, **fields: Any) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "time": time.time(), **fields}, default=str)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
