"""Fixtures of the analysis tests (helpers live in analysis_helpers.py, importable from here)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from analysis_helpers import load_analyze  # noqa: E402


@pytest.fixture(scope="session")
def analyze():
    return load_analyze()
