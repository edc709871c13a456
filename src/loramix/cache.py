"""Where loramix keeps what it builds once per machine (the embedded model's converted folder, compiled C kernels),
in a module of its own so that any layer can find it without importing the model loader."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root folder of loramix's cache: ``$LORAMIX_CACHE``, else ``$XDG_CACHE_HOME/loramix``, else
    ``~/.cache/loramix``."""
    if os.environ.get("LORAMIX_CACHE"):
        return Path(os.environ["LORAMIX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loramix"
