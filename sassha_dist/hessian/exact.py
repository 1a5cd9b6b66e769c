"""The exact Hutchinson estimate fused into a gradient pass: z ⊙ (∇²f z) by double backward.

One forward per micro-batch, its gradient with ``create_graph=True``, then one double backward
per probe (:func:`~sassha_dist.hessian.hvp.exact_hvp`). The strategy says what to
differentiate (the parameters, or FSDP2's unsharded copies) and how the gradient and the
estimate are averaged over ranks; engines without double backward use finite differences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from sassha_dist.closures import Closure
from sassha_dist.distributed.strategy import Strategy
from sassha_dist.functional import state_dtype
from sassha_dist.hessian.hvp import accumulate_hutchinson_, exact_hvp

__all__ = ["ExactProducts", "exact_products"]


class ExactProducts(NamedTuple):
    """What one fused pass produced."""

    #: The summed loss of the micro-batches, detached.
    loss: torch.Tensor
    #: The reduced gradients, laid out like the parameters.
    gradients: list[torch.Tensor]
    #: This rank's local estimates, in the state dtype.
    estimates: list[torch.Tensor]
    #: Per parameter, whether this rank's graph reached it.
    used: list[bool]


def exact_products(
    strategy: Strategy,
    params: list[torch.Tensor],
    closures: list[Closure],
    *,
    n_samples: int,
    evaluate: Callable[[Closure, int], torch.Tensor],
    probes: Callable[[list[torch.Tensor], int], list[torch.Tensor]],
) -> ExactProducts:
    """Gradient and exact Hutchinson estimate from one graph per micro-batch.

    ``evaluate(closure, index)`` computes a micro-batch's loss (with the step's random numbers);
    ``probes(tensors, sample)`` draws whole-tensor probes for the tensors differentiated.
    """
    # Sums over micro-batches and samples, started from the first term (no zero-filled buffers).
    estimates: list[torch.Tensor] = []
    gradients: list[torch.Tensor] = []
    probe_sets: list[list[torch.Tensor]] = []
    used = [False] * len(params)
    total = None
    with strategy.exact_hessian_context():
        for index, closure in enumerate(closures):
            loss = evaluate(closure, index)
            inputs = strategy.differentiable_params(params)
            if not probe_sets:
                probe_sets = [probes(inputs, s) for s in range(n_samples)]
            grads = strategy.gradients_with_graph(loss, inputs)
            used = [u or g is not None for u, g in zip(used, grads, strict=True)]
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
            for sample, sample_probes in enumerate(probe_sets):
                products = exact_hvp(grads, inputs, sample_probes, retain_graph=sample < n_samples - 1)
                # in the state dtype; the first products become the estimates in place
                products = [hv.to(state_dtype(hv.dtype)) for hv in products]
                signs = [z.to(hv.dtype) for z, hv in zip(sample_probes, products, strict=True)]
                estimates = accumulate_hutchinson_(estimates, signs, products, 1.0 / n_samples)
            with torch.no_grad():
                if gradients:
                    torch._foreach_add_(gradients, [g.detach() for g in grads])
                else:
                    gradients = [g.detach() for g in grads]
            total = loss.detach() if total is None else total + loss.detach()
    reduced = strategy.reduce_exact(params, gradients)
    local_estimates = [strategy.local(e) for e in strategy.reduce_exact(params, estimates)]
    return ExactProducts(total, reduced, local_estimates, used)
