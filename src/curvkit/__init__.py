"""curvkit: curvature of neural-network losses as fast matrix-free linear operators."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("curvkit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0.dev0"

# Subpackages load on first use (``curvkit.linalg``, ``curvkit.curvature``, ...), so that
# ``import curvkit`` and the command line stay fast.
_SUBPACKAGES = ("linalg", "curvature", "optim", "taylor", "pinn", "apps")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"curvkit.{name}")
    raise AttributeError(f"module 'curvkit' has no attribute {name!r}")


__all__ = ["__version__", *_SUBPACKAGES]
