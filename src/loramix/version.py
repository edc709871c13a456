"""The library's version, in a module of its own so that any module can record it (``save_adapter``
writes it into every adapter folder) without importing the package root, which imports everything."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's version
