"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class TkError(Exception):
    """A problem the user can fix (bad option, unknown name, missing file...).

    The CLI prints ``str(error)`` as a single line on stderr and exits with
    ``exit_code``; no traceback unless ``TK_DEBUG=1``.
    """

    exit_code = 2


class UnknownNameError(TkError):
    """A component name that no plugin registered."""


class AmbiguousNameError(TkError):
    """A component name registered by more than one plugin."""


class PluginError(TkError):
    """A plugin failed to import or register (fatal only with TK_STRICT_PLUGINS=1)."""


class WeightsNotFoundError(TkError):
    """Pretrained weights were asked for but are nowhere on disk and cannot be downloaded."""

    def __init__(self, backbone: str, filename: str, url: str | None, looked_in: list[str]):
        self.backbone = backbone
        self.filename = filename
        self.url = url
        self.looked_in = looked_in
        where = f" from {url}" if url else ""
        super().__init__(
            f"pretrained weights for '{backbone}' not found ({filename}; looked in "
            f"{', '.join(looked_in) or 'nowhere'}) and download failed: get it{where}, then run "
            f"`tk store import-weights {backbone} FILE` (or pass --weights FILE, "
            f"or --no-pretrained for random weights)"
        )


class DataError(TkError):
    """Training or inference data that cannot be used as given."""


class StoreError(TkError):
    """A model store problem: missing model, damaged file, failed write."""
