"""tk's version: one constant on the ground floor, so any layer can record it without
importing the package's face (:mod:`toolkit`, which reaches up to the model layer)."""

__version__ = "0.1.0"
