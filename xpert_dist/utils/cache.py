"""Where xpert-dist keeps what it computes once per machine (base-model evaluations, dequantised GGUF models)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XPERT_DIST_CACHE``, else ``$XDG_CACHE_HOME/xpert_dist`` (``~/.cache/xpert_dist``)."""
    if os.environ.get("XPERT_DIST_CACHE"):
        return Path(os.environ["XPERT_DIST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xpert_dist"
