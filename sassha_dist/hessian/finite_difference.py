r"""The finite-difference Hutchinson estimate, written once for every engine.

.. math::
    \tilde H = \frac{1}{S}\sum_s z_s \odot \frac{g(w + h z_s) - g(w - h z_s)}{2h}
    \quad\text{(central)}, \qquad
    \frac{1}{S}\sum_s z_s \odot \frac{g(w + h z_s) - g(w)}{h} \quad\text{(forward)}

:func:`hutchinson_by_differences` draws the probes, weighs and accumulates the products
(:func:`~sassha_dist.hessian.hvp.accumulate_hutchinson_`); how one difference's passes run is
the pass runner's :class:`DifferencePasses` (:mod:`sassha_dist.passes`): plain autograd, DDP and
FSDP read ``p.grad``, the ZeRO runner reads DeepSpeed's gradient partitions. ``Sassha.hessian_pass``
calls it for every engine, with one step ``h`` for the whole model
(:func:`~sassha_dist.hessian.hvp.finite_difference_step`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from sassha_dist.hessian.hvp import accumulate_hutchinson_

__all__ = ["DifferencePasses", "difference_weight", "hutchinson_by_differences"]


class DifferencePasses(ABC):
    """The passes of one probe's finite difference around ``w``, as one engine runs them.

    Each method starts with the parameters at ``w`` and leaves them there, and returns the
    difference in buffers the step owns, in the state dtype.
    """

    #: Passes whose forward scheme returns :math:`g(w + hz)` alone sum the probes here, for the
    #: pass that later takes :math:`g(w)` (``StepState.forward_correction``).
    probe_sum: list[torch.Tensor]

    @abstractmethod
    def central(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        """:math:`g(w + hz) - g(w - hz)`."""

    @abstractmethod
    def forward(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        """:math:`g(w + hz) - g(w)`, or :math:`g(w + hz)` alone where :math:`g(w)` comes later.

        (The ZeRO driver takes :math:`g(w)` in its last pass and subtracts
        :math:`\\sum_s z_s \\odot g(w)` from the estimate then.)
        """


def difference_weight(h: float, *, central: bool, n_samples: int) -> float:
    """The weight of one probe's ``z * difference`` in the estimate: ``1 / (2h S)`` or ``1 / (h S)``."""
    return 1.0 / ((2.0 * h if central else h) * n_samples)


def hutchinson_by_differences(
    passes: DifferencePasses,
    probes: Callable[[int], list[torch.Tensor]],
    *,
    h: float,
    central: bool,
    n_samples: int,
) -> list[torch.Tensor]:
    """The estimate from ``n_samples`` probes (``probes(sample)``, int8 signs) at step ``h``."""
    weight = difference_weight(h, central=central, n_samples=n_samples)
    estimates: list[torch.Tensor] = []
    for sample in range(n_samples):
        signs = probes(sample)
        difference = passes.central(signs, h) if central else passes.forward(signs, h)
        estimates = accumulate_hutchinson_(estimates, signs, difference, weight)
    return estimates
