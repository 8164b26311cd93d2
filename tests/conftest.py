"""Shared test configuration: float64 by default, one torch thread per xdist worker."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores; avoid oversubscription


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny calls: OpenMP's thread hand-off costs more than
    it saves there, and spin-waits on a shared, loaded machine (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _float64_default():
    """Run every test with float64 as the default dtype, restoring the previous one after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# Device tests (``test_*_device.py``) compare a run on an accelerator with the CPU run.
# CURVKIT_TEST_DEVICE picks the accelerator (default ``cuda``); setting it to ``cpu`` runs the
# same comparisons CPU against CPU, which checks the tests themselves on a machine without GPU.
TEST_DEVICE = os.environ.get("CURVKIT_TEST_DEVICE", "cuda")


def _device_available(name: str) -> bool:
    kind = torch.device(name).type
    if kind == "cpu":
        return True
    module = getattr(torch, kind, None)
    return bool(module is not None and module.is_available())


@pytest.fixture
def device():
    """The accelerator under test, or a skip when this machine has none."""
    if not _device_available(TEST_DEVICE):
        pytest.skip(f"needs a {TEST_DEVICE} device (set CURVKIT_TEST_DEVICE=cpu to self-check)")
    return _indexed(TEST_DEVICE)


def _indexed(name: str) -> torch.device:
    """``cuda`` as tensors report it (``cuda:0``), so that ``t.device == device`` holds."""
    return torch.empty(0, device=name).device


@pytest.fixture
def other_device():
    """A device other than the CPU for mixed-device checks: the accelerator when there is one,
    else ``meta`` (input checks run before any arithmetic, so they are testable without GPU)."""
    if TEST_DEVICE != "cpu" and _device_available(TEST_DEVICE):
        return _indexed(TEST_DEVICE)
    return torch.device("meta")
