"""The optimizer tests run many tiny linear-algebra calls; on a shared 2-core machine OpenMP's
thread hand-off costs ~20 ms per call, so they run single-threaded (restored afterwards)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with ``one_thread`` (tests/conftest.py)."""
