"""Imports every built-in command module so each adds itself to the `tk` group."""

from toolkit.cli import listing  # noqa: F401
