"""tk: a plugin-based microtoolkit for fine-tuning pretrained image backbones.

The core (this package) knows no concrete model, dataset or loss: everything is a
plugin registered through the hooks in :mod:`toolkit.plugin.hookspecs`.
"""

__version__ = "0.1.0"
