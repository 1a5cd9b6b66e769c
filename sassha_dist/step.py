"""What one SASSHA step carries between its passes, and what it reports.

:class:`StepState` is the public per-step state: ``Sassha.perturb`` (or a driver's one-pass
start) creates it, the passes fill it, ``Sassha.update`` consumes it. Drivers that run the
passes through an engine (the ZeRO driver) read it through ``Sassha.current_step`` and hand a
partition's share of it to ``Sassha.apply_update`` (:meth:`StepState.subset`).
:class:`StepReport` is what the last step did (``Sassha.last_report``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["StepReport", "StepState"]


@dataclass
class StepReport:
    """What the last step did. Tensors stay on device (reading them syncs)."""

    loss: torch.Tensor | None = None
    perturbed_loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    hessian_refreshed: bool = False
    skipped: bool = False
    reason: str | None = None
    #: On finite-difference Hessian steps: this rank's fraction of coordinates whose estimate
    #: underflowed to 0 with a nonzero gradient (:func:`~sassha_dist.hessian.hvp.curvature_underflow`).
    hessian_underflow: torch.Tensor | None = None


@dataclass
class StepState:
    """One step's parameters and what its passes produced, from ``perturb`` to ``update``."""

    #: The parameters taking part (those with a gradient, or every one under ZeRO).
    params: list[torch.Tensor]
    #: This rank's local view of each (the parameter itself, a DTensor's shard, a flat view).
    locals: list[torch.Tensor]
    #: Each parameter's ordinal over all groups: the probe's ``param_index``.
    probe_indices: list[int]
    #: Each parameter's group.
    group_indices: list[int]
    #: The exact local theta, to restore (empty when nothing will move it).
    theta: list[torch.Tensor]
    #: Whether this step refreshes the Hessian.
    hessian_due: bool
    report: StepReport
    #: The local Hutchinson estimate, once a pass formed it.
    estimates: list[torch.Tensor] | None = None
    #: Local finiteness flags by name; ``update`` ANDs them over ranks in one collective.
    checks: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    #: One pass serves as both: rho is 0 in every group (theta + eps = theta), or the momentum
    #: ascent moved before the pass (``perturbation="momentum"``).
    one_pass: bool = False
    #: The local tensors ``theta`` restores, when not ``locals``: the momentum ascent moves every
    #: trainable parameter, the step updates those with a gradient.
    moved: list[torch.Tensor] | None = None
    #: Forward differences taken before the gradient at their point (a runner whose update
    #: reads the last pass, ZeRO): the sum of the probes and the weight ``1/(hS)``. The last pass
    #: subtracts ``weight * probe_sum * g(w)`` from the estimate.
    forward_correction: tuple[list[torch.Tensor], float] | None = None

    @property
    def restored(self) -> list[torch.Tensor]:
        """The local tensors that ``theta`` is the exact value of."""
        return self.locals if self.moved is None else self.moved

    def subset(self, members: Sequence[int], group_indices: Sequence[int]) -> StepState:
        """The share of ``members`` (positions in ``params``), regrouped as ``group_indices``."""
        if self.moved is not None:
            raise RuntimeError("StepState.subset() needs theta aligned with params (moved is None).")
        return StepState(
            params=[self.params[i] for i in members],
            locals=[self.locals[i] for i in members],
            probe_indices=[self.probe_indices[i] for i in members],
            group_indices=list(group_indices),
            theta=[self.theta[i] for i in members] if self.theta else [],
            hessian_due=self.hessian_due,
            report=self.report,
            estimates=None if self.estimates is None else [self.estimates[i] for i in members],
            one_pass=self.one_pass,
        )
