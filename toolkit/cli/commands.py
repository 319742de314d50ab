"""Imports every built-in command module so each adds itself to the `tk` group."""

from toolkit.cli import (
    export,  # noqa: F401
    finetune,  # noqa: F401
    infer,  # noqa: F401
    listing,  # noqa: F401
    store,  # noqa: F401
    tune,  # noqa: F401
)
