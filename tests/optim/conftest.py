"""The optimizer tests run many tiny linear-algebra calls; on a shared 2-core machine OpenMP's
thread hand-off costs ~20 ms per call, so they run single-threaded (restored afterwards)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
