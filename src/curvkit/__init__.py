"""curvkit: curvature of neural-network losses as fast matrix-free linear operators."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("curvkit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0.dev0"

__all__ = ["__version__"]
