"""tk-plugin-textures: a third-party plugin for tk.

Everything tk sees lives in :mod:`tk_textures.plugin` (the entry point). The components
live in their own modules and import torch only when they are built, so installing this
plugin does not slow down ``tk --help``.
"""

__version__ = "0.3.0"
