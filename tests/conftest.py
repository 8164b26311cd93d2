"""Shared test configuration: float64 by default, one torch thread per xdist worker."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores; avoid oversubscription


@pytest.fixture(autouse=True)
def _float64_default():
    """Run every test with float64 as the default dtype, restoring the previous one after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
