"""Shared fixtures: tiny random Llama models (fast), paths to the shared real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# base-model reference metrics of the runs the tests start go to a cache of this session, not the user's
if "XPERT_DIST_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["XPERT_DIST_CACHE"] = tempfile.mkdtemp(prefix="xpert_dist_test_cache_")
    atexit.register(shutil.rmtree, os.environ["XPERT_DIST_CACHE"], True)

from helpers import SHARED_DATA  # noqa: E402


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 255, (8, 32), generator=g)


@pytest.fixture
def medquad_path() -> Path:
    return SHARED_DATA / "health" / "medquad_train.jsonl"
