r"""Hessian-vector products, the two ways an engine may allow.

``exact``: double backward. Given gradients built with ``create_graph=True``,
:math:`Hz = \nabla_\theta (g^\top z)`. Costs about one extra backward pass on
top of the gradient, and needs every parameter to stay in the autograd graph:
single device and DDP allow it, sharded engines (FSDP, ZeRO) do not.

``finite_difference``: only first-order passes, so every engine allows it.

.. math::
    \text{central: } Hz \approx \frac{g(w + hz) - g(w - hz)}{2h}, \qquad
    \text{forward: } Hz \approx \frac{g(w + hz) - g(w)}{h}

with ONE global scalar step :math:`h = h_0 \lVert w \rVert / \lVert z \rVert`
over all parameters. A per-tensor step would estimate
:math:`z \odot (S^{-1} H S z)` for a diagonal rescaling :math:`S`, still
unbiased for the diagonal but with cross-tensor terms weighted by step ratios
(measured on a tiny GPT-2: about 5x the variance). Central differences cancel
the :math:`O(h)` term (measured fp32 relative error 5.5e-5 at :math:`h_0 =
10^{-3}` against the exact product); forward differences reuse the step's
perturbed gradient, one pass instead of two, at about 20x the error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "UNDERFLOW_SAFE_EPS",
    "UNDERFLOW_WARNING_FRACTION",
    "accumulate_hutchinson_",
    "curvature_underflow",
    "default_fd_step",
    "exact_hvp",
    "finite_difference_step",
]

# Relative step h0 that minimised the finite-difference error on a tiny GPT-2
# (SPEC §4): fp32 central 1e-3; in bf16 the perturbation must stay well above
# bf16 rounding of w (|h z| >> 2**-8 |w|), best at 2e-2..3e-2.
_FD_STEP_FP32 = 1e-3
_FD_STEP_HALF = 2.5e-2

#: Fraction of coordinates with an underflowed estimate (see :func:`curvature_underflow`) above
#: which Sassha warns. Measured: 0 with fp32 gradients, 0.5% on a tiny GPT-2 with bf16 gradients.
UNDERFLOW_WARNING_FRACTION = 1e-3
#: The ``eps`` from which Sassha no longer warns: an underflowed coordinate then steps by at most
#: ``lr * m / 1e-2``, comparable to a typical one (median sqrt(D) ~ 3e-2 on a tiny GPT-2), and
#: the bf16 DeepSpeed run that diverged at eps=1e-4 trains normally.
UNDERFLOW_SAFE_EPS = 1e-2


def default_fd_step(dtype: torch.dtype) -> float:
    """The relative finite-difference step ``h0`` for parameters of ``dtype``."""
    return _FD_STEP_HALF if dtype in (torch.bfloat16, torch.float16) else _FD_STEP_FP32


def finite_difference_step(fd_step: float, point_norm: float, num_elements: int) -> float:
    """``h = fd_step * ||w|| / ||z||`` with ``||z|| = sqrt(num_elements)`` for a Rademacher z.

    Falls back to ``h = fd_step`` at ``w = 0``, where a relative step is undefined.
    """
    if num_elements <= 0:
        raise ValueError(f"Invalid {num_elements=}. Must be > 0.")
    if point_norm == 0.0:
        return fd_step
    return fd_step * point_norm / math.sqrt(num_elements)


def exact_hvp(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    *,
    retain_graph: bool,
) -> list[torch.Tensor]:
    """``H v`` by double backward through ``grads`` (built with ``create_graph=True``).

    A parameter that the gradient graph does not reach has a zero product, and
    a gradient that is constant in the parameters (no graph) contributes none.
    """
    linked = [(g, v) for g, v in zip(grads, vectors, strict=True) if g.requires_grad]
    if not linked:
        return [torch.zeros_like(p) for p in params]
    products = torch.autograd.grad(
        [g for g, _ in linked],
        params,
        grad_outputs=[v for _, v in linked],
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(p) if hv is None else hv for p, hv in zip(params, products, strict=True)]


@torch.no_grad()
def accumulate_hutchinson_(
    estimates: list[torch.Tensor],
    probes: Sequence[torch.Tensor],
    products: list[torch.Tensor],
    weight: float,
) -> list[torch.Tensor]:
    """``estimates + weight * z * Hz`` per tensor; with no ``estimates`` yet, ``products`` become them.

    ``products`` (the ``Hz`` terms, or a finite difference of gradients) are consumed: the first
    probe's are turned into the estimate in place, so no zero-filled accumulator is allocated. ``z``
    is +-1, so ``(Hz * z) * weight`` equals addcmul's ``weight * z * Hz`` bit for bit.
    """
    if estimates:
        for est, z, hz in zip(estimates, probes, products, strict=True):
            est.addcmul_(z, hz, value=weight)
        return estimates
    torch._foreach_mul_(products, list(probes))
    torch._foreach_mul_(products, weight)
    return products


@torch.no_grad()
def curvature_underflow(estimates: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""Local fraction of coordinates whose estimate is exactly 0 while their gradient is not (no sync).

    With bf16/fp16 gradients a finite difference is quantised: where
    :math:`g(w+hz) - g(w-hz)` is below one rounding step of :math:`g`, both round
    to the same value and the estimate is exactly 0 although the coordinate
    moves. Its ``D`` then stays 0, and its update is :math:`\eta\, m / \epsilon`,
    large enough to diverge with the default ``eps``. Coordinates with a zero
    gradient (unused embeddings, padding) have ``m = 0`` and do not count.
    """
    total = sum(e.numel() for e in estimates)
    if total == 0:
        return torch.zeros(())
    counts = [((e == 0) & (g != 0)).sum() for e, g in zip(estimates, gradients, strict=True) if e.numel()]
    return torch.stack(counts).sum() / total
