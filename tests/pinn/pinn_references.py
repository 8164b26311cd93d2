"""Reference residuals for the PINN tests, written with torch.func independently of the library."""

import torch
from torch.func import functional_call, hessian, jacrev, vmap

from curvkit.pinn.base import Derivatives


def reference_residuals(model, problem, batch):
    """``r̃(θ)`` and ``J = ∂r̃/∂θ`` by nested autograd, on the model's device.

    Interior and boundary blocks are each scaled by ``1/sqrt(N)`` as in the spec.
    """
    X_in, X_bd = batch
    idx = list(problem.laplacian_index)

    def r(params):
        u = lambda x: functional_call(model, params, (x.unsqueeze(0),)).reshape(())  # noqa: E731
        H = vmap(hessian(u))(X_in)
        d = Derivatives(
            vmap(u)(X_in), vmap(jacrev(u))(X_in), H.diagonal(dim1=1, dim2=2)[:, idx].sum(1)
        )
        r_in = problem.residual(X_in, d) / X_in.shape[0] ** 0.5
        r_bd = (vmap(u)(X_bd) - problem.solution(X_bd)) / X_bd.shape[0] ** 0.5
        return torch.cat([r_in, r_bd])

    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(r)(params)
    J = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], dim=1)
    return r(params), J
