"""Curvature tests run on tiny models: one intra-op thread is fastest and immune to the
spin-waiting that two threads suffer on a shared, loaded 2-core machine."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the shared `cases` module


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
