"""Who runs a step's backward passes: the :class:`PassRunner` behind ``Sassha``'s phases.

A SASSHA step is one sequence of phases, written once in ``Sassha.run_passes`` (gradient at
theta, perturb, perturbed gradient, finite differences, then ``update``). What differs per
engine is split in two: the ``Strategy`` says where a shard sits and how scalars and exact
products reduce; the pass runner says who runs a backward of the step's closures and where its
reduced gradient lands.

* :data:`AUTOGRAD_PASSES` (the base class): ``loss.backward()`` through the strategy, for a
  single device, DDP's reducer and FSDP's hooks. Gradients land in ``p.grad``.
* ``ZeroPasses`` (:mod:`sassha_dist.distributed.deepspeed.passes`): DeepSpeed's
  ``engine.backward``. The update reads the reduced gradient of the step's last pass from the
  engine's own buffers (:attr:`PassRunner.update_reads_last_pass`), so the finite differences
  run before the perturbed pass there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from sassha_dist.closures import Closure, negated
from sassha_dist.distributed.strategy import Strategy
from sassha_dist.functional import state_dtype
from sassha_dist.hessian.finite_difference import DifferencePasses
from sassha_dist.step import StepState

__all__ = ["AUTOGRAD_PASSES", "PassRunner", "SteppingOptimizer"]

Backward = Callable[[torch.Tensor, Sequence[torch.Tensor]], None]


class SteppingOptimizer(Protocol):
    """What a pass runner uses of the optimizer whose step it runs (``Sassha``)."""

    strategy: Strategy

    def evaluate_in_step(self, closure: Closure, index: int) -> torch.Tensor:
        """Micro-batch ``index``'s loss, with the step's random numbers replayed."""
        ...


class PassRunner:
    """How an engine runs the backward passes of one SASSHA step.

    The base class runs them through autograd and the strategy's ``backward`` (a single device,
    DDP's reducer, FSDP's hooks; :data:`AUTOGRAD_PASSES`); an engine that runs its own backward
    overrides what differs.
    """

    #: The update reads the reduced gradient of the step's last pass where the engine keeps it
    #: (DeepSpeed's buffers), so that pass (the perturbed one, or a one-pass step's only pass)
    #: runs after the finite differences, through :meth:`last_pass`.
    update_reads_last_pass: bool = False

    def accumulate(
        self,
        optimizer: SteppingOptimizer,
        closures: list[Closure],
        params: list[torch.Tensor],
        backward: Backward | None = None,
    ) -> torch.Tensor:
        """A backward of every closure at the current parameters, the reduced gradient into ``p.grad``.

        ``backward`` (default: the strategy's) reduces one loss's gradient; returns the summed
        loss, detached. Every closure call goes through ``optimizer.evaluate_in_step``.
        """
        backward = backward or optimizer.strategy.backward
        total = None
        for index, closure in enumerate(closures):
            loss = optimizer.evaluate_in_step(closure, index)
            backward(loss, params)
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def last_pass(
        self, optimizer: SteppingOptimizer, closures: list[Closure]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The step's last pass, left in the engine for the update; returns its loss and local gradients.

        Only runners with :attr:`update_reads_last_pass` have one.
        """
        raise NotImplementedError(f"{type(self).__name__} leaves every gradient in p.grad.")

    def take_gradients(
        self, optimizer: SteppingOptimizer, params: list[torch.Tensor], local_params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Detach the local gradients from ``params`` (zeros where none), leaving ``p.grad = None``.

        The tensors are the step's own: the engine does not write them in a later pass.
        """
        strategy = optimizer.strategy
        grads = [
            strategy.owned_gradient(torch.zeros_like(local) if p.grad is None else strategy.local(p.grad))
            for p, local in zip(params, local_params, strict=True)
        ]
        for p in params:
            p.grad = None
        return grads

    def compute_dtype(self, params: list[torch.Tensor]) -> torch.dtype:
        """The dtype the passes compute in, which sets the default finite-difference step."""
        return params[0].dtype

    def difference_passes(
        self,
        optimizer: SteppingOptimizer,
        step: StepState,
        closures: list[Closure],
        gradient_at_point: list[torch.Tensor] | None,
    ) -> DifferencePasses:
        """The passes of one probe's finite difference around the step's point ``w``.

        ``gradient_at_point`` is ``g(w)``, or ``None`` when it comes later
        (:attr:`update_reads_last_pass`); the forward scheme then sums the probes in the
        passes' ``probe_sum`` instead.
        """
        if gradient_at_point is None:
            raise ValueError(f"{type(self).__name__} takes the gradient at the point before the differences.")
        low_precision = any(state_dtype(p.dtype) != p.dtype for p in step.locals)
        point = [p.detach().clone() for p in step.locals] if low_precision else None
        return _AutogradDifferences(self, optimizer, step, point, gradient_at_point, closures)

    def parameters_moved(self) -> None:
        """The optimizer changed the local tensors: bring the engine's copy of the parameters along."""

    def step_started(self, optimizer: SteppingOptimizer, step: StepState) -> None:
        """The step's parameters are chosen (after ``perturb``'s gradient norm, before its passes)."""

    def step_cancelled(self, moved: bool) -> None:
        """A started step was cancelled (``moved``: the parameters had left theta, now restored)."""


#: The pass runner of ``Sassha``'s own phases: autograd through the strategy.
AUTOGRAD_PASSES = PassRunner()


class _AutogradDifferences(DifferencePasses):
    """Finite differences whose passes accumulate into ``p.grad`` (single device, DDP, FSDP).

    With full-precision parameters ``w`` is not copied: the passes move the parameters by
    ``+hz, -2hz, +hz``, and the second central pass back-propagates the negated loss onto the
    first gradient, so the difference forms in the gradient buffers (negation is exact, so this
    equals the subtraction bit for bit). Low-precision parameters are set from the exact copy
    ``point`` instead.
    """

    def __init__(
        self,
        runner: PassRunner,
        optimizer: SteppingOptimizer,
        step: StepState,
        point: list[torch.Tensor] | None,
        gradient_at_point: list[torch.Tensor],
        closures: list[Closure],
    ) -> None:
        self.runner, self.optimizer, self.step, self.point = runner, optimizer, step, point
        self.gradient_at_point, self.closures = gradient_at_point, closures

    def _move_to(self, signs: list[torch.Tensor], h: float) -> None:
        """Parameters to ``w + h z``: set exactly from ``point``, or moved from ``w`` without one."""
        if self.point is not None:
            torch._foreach_copy_(self.step.locals, self.point)
        torch._foreach_add_(self.step.locals, signs, alpha=h)

    def _accumulate(self, closures: list[Closure]) -> None:
        with torch.enable_grad():
            self.runner.accumulate(self.optimizer, closures, self.step.params)

    def _take(self) -> list[torch.Tensor]:
        return self.runner.take_gradients(self.optimizer, self.step.params, self.step.locals)

    def _take_in_state_dtype(self) -> list[torch.Tensor]:
        return [g.to(state_dtype(g.dtype)) for g in self._take()]

    def central(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        locals_ = self.step.locals
        self._move_to(signs, h)
        self._accumulate(self.closures)
        if self.point is None:
            torch._foreach_add_(locals_, signs, alpha=-2.0 * h)
            self._accumulate([negated(c) for c in self.closures])
            torch._foreach_add_(locals_, signs, alpha=h)
            return self._take()
        difference = self._take_in_state_dtype()
        self._move_to(signs, -h)
        self._accumulate(self.closures)
        torch._foreach_sub_(difference, self._take_in_state_dtype())
        torch._foreach_copy_(locals_, self.point)
        return difference

    def forward(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        self._move_to(signs, h)
        self._accumulate(self.closures)
        difference = self._take_in_state_dtype()
        at_point = [g.to(d.dtype) for g, d in zip(self.gradient_at_point, difference, strict=True)]
        torch._foreach_sub_(difference, at_point)
        if self.point is None:
            torch._foreach_add_(self.step.locals, signs, alpha=-h)
        else:
            torch._foreach_copy_(self.step.locals, self.point)
        return difference
