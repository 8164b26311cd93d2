"""Re-export of the built-in LM data (kept for the benchmark scripts that import it)."""

from curvkit.apps.lm import load_stdlib_bytes, sample_batch

__all__ = ["load_stdlib_bytes", "sample_batch"]
