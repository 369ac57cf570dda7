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


# --- test tiers ------------------------------------------------------------------------------------
# `make test` runs the default tier: everything but the real-model end-to-end runs (marker `e2e`,
# minutes each); `make test-e2e` runs those; CI (.ci/run) runs both. A run that names test files or
# node ids itself runs exactly what it names, whatever their tier.
TIERS = ("default", "e2e", "all")


def pytest_addoption(parser):
    parser.addoption("--tier", choices=TIERS, default="default",
                     help="default: all but the real-model end-to-end runs (marker e2e); e2e: only those; all: both")


def _named_explicitly(config) -> bool:
    return config.args_source == pytest.Config.ArgsSource.ARGS


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("--tier")
    if tier == "all" or (tier == "default" and _named_explicitly(config)):
        return
    keep, drop = [], []
    for item in items:
        in_e2e = item.get_closest_marker("e2e") is not None
        (keep if in_e2e == (tier == "e2e") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
        config._xpert_tier_dropped = len(drop)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    dropped = getattr(config, "_xpert_tier_dropped", 0)
    if dropped and config.getoption("--tier") == "default":
        terminalreporter.write_line(
            f"tier default: {dropped} real-model end-to-end test(s) (marker e2e) not run here; "
            "`make test-e2e` runs them, and CI runs both tiers")
