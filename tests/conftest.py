"""Shared fixtures: tiny random Llama models (fast), paths to the shared real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import SHARED_DATA  # noqa: E402


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 255, (8, 32), generator=g)


@pytest.fixture
def medquad_path() -> Path:
    return SHARED_DATA / "health" / "medquad_train.jsonl"
