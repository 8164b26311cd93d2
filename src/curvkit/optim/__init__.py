"""Structured optimizers: Shampoo, SOAP, KL-Shampoo, KL-SOAP, Muon, SpectralShampoo and Symo.

The four Kronecker-factored methods share one basis machinery (:mod:`curvkit.optim._basis`):
bases refreshed by ``eigh``, by a QR power-iteration step, or by a subspace QR, and a
``state_dtype`` (e.g. ``torch.bfloat16``) for their stored state.
"""

from curvkit.optim._common import NonFiniteGradientError
from curvkit.optim.kl_shampoo import KLSOAP, KLShampoo
from curvkit.optim.muon import Muon, muon_param_groups, newton_schulz
from curvkit.optim.shampoo import Shampoo
from curvkit.optim.soap import SOAP
from curvkit.optim.spectral import SpectralShampoo
from curvkit.optim.symmetry_precond import Symo

__all__ = [
    "KLSOAP",
    "SOAP",
    "KLShampoo",
    "Muon",
    "NonFiniteGradientError",
    "Shampoo",
    "SpectralShampoo",
    "Symo",
    "muon_param_groups",
    "newton_schulz",
]
