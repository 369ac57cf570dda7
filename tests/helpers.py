"""Helpers shared by tests (importable: pytest.ini puts tests/ on sys.path)."""
from __future__ import annotations

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_model(seed: int = 0, **overrides):
    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import load_model

    return load_model(ModelConfig(tiny=overrides), seed=seed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
