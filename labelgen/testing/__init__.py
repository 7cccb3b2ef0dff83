"""Test helpers shipped in the package, for tests only: the fake generator (``fake``, registered when
this package is imported: ``--plugin labelgen.testing``), image folders and corrupt files
(``images``), and the ground-truth oracle generator (``oracle``, registered when imported)."""
from .fake import *  # noqa: F401,F403  (registers the fake generator)
from .fake import __all__  # noqa: F401
