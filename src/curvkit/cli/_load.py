"""Helpers of the command line: user factories named as ``pkg.module:factory``, devices."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch


def load_factory(spec: str, option: str) -> Callable:
    """Import ``pkg.module:factory`` and return the callable, with a clear error for a bad path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{option}: expected 'pkg.module:factory'; got {spec!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{option}: cannot import module {module_name!r} ({err}).") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{option}: module {module_name!r} has no callable {attr!r}.")
    return factory


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refusing a device that this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device: not a device name: {name!r}.") from err
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(
            f"--device {name}: no such CUDA device on this machine "
            f"({torch.cuda.device_count()} available)."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine.")
    if device.type == "meta":
        # Meta tensors have shapes but no values: the commands compute numbers.
        raise ValueError(f"--device {name}: the meta device holds no data; name a device that "
                         "computes (cpu, cuda, ...).")
    try:  # other backends (xpu, hpu, ...) fail on first use, some with a bare AssertionError
        # The device as tensors report it: 'cpu:1' is 'cpu', which device checks compare with.
        return torch.empty(0, device=device).device
    except (RuntimeError, AssertionError, NotImplementedError, ImportError) as err:
        # PyTorch's first sentence names the cause; the rest can be a list of every backend.
        reason = (str(err).strip() or type(err).__name__).splitlines()[0].split(". ")[0]
        raise ValueError(f"--device {name}: not available on this machine ({reason}).") from err
