"""Imports every built-in command module so each adds itself to the `tk` group."""

from toolkit.cli import listing  # noqa: F401
from toolkit.cli import finetune  # noqa: F401
from toolkit.cli import store  # noqa: F401
from toolkit.cli import infer  # noqa: F401
