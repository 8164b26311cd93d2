"""Curvature tests run on tiny models: one intra-op thread is fastest and immune to the
spin-waiting that two threads suffer on a shared, loaded 2-core machine."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the shared `cases` module


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with ``one_thread`` (tests/conftest.py)."""
