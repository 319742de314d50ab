"""Progress on stderr that suits where stderr goes.

In a terminal: a tqdm bar; lines printed meanwhile (warnings, and table rows on a stdout
that is the same terminal) go through :meth:`Progress.write` / :meth:`Progress.outside`,
which clear the bar, print, and draw it again, so nothing tears. Anywhere else (a log
file, CI, ``make demo > log``): no ``\\r`` updates, only a sparse plain line now and then
(``tk: infer: 400/1000 files (40%), 52.1 files/s``): none during the first
:data:`QUIET_START` seconds, then one per tenth of the work or per :data:`PLAIN_EVERY`
seconds, whichever comes first.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

QUIET_START = 5.0
PLAIN_EVERY = 60.0


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """``total`` units of work named ``desc``; silent when not ``enabled``."""

    def __init__(self, total: int, desc: str, *, unit: str = "file", enabled: bool = True,
                 stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.enabled = enabled and self.stream is not None
        self.done = 0
        self.start = time.monotonic()
        self._last_line = self.start
        self._last_done = 0
        self.bar: Any = None
        if self.enabled and _is_tty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit=unit, file=self.stream, desc=desc,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            self._plain()

    def _plain(self) -> None:
        now = time.monotonic()
        if now - self.start < QUIET_START or self.done >= self.total:
            return
        tenth = max(1, self.total // 10)
        if self.done - self._last_done < tenth and now - self._last_line < PLAIN_EVERY:
            return
        rate = self.done / (now - self.start)
        pct = 100 * self.done / self.total if self.total else 100.0
        self._print(f"tk: {self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%), "
                    f"{rate:.1f} {self.unit}s/s")
        self._last_line, self._last_done = now, self.done

    def _print(self, line: str) -> None:
        try:
            print(line, file=self.stream, flush=True)
        except (OSError, ValueError):  # stderr gone: progress is not worth failing for
            self.enabled = False

    def write(self, line: str) -> None:
        """A line on stderr (a warning) without tearing the bar."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self._print(line)

    @contextlib.contextmanager
    def outside(self, other: Any) -> Iterator[None]:
        """Write to ``other`` (e.g. stdout) inside this block: when ``other`` is a terminal
        too the bar is cleared first and drawn again after."""
        if self.bar is None or not _is_tty(other):
            yield
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            yield

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
