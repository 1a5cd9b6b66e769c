"""ZeroPasses: the backward passes of a SASSHA step through a DeepSpeed engine (the pass runner)."""

from __future__ import annotations

from typing import Any

import torch

from sassha_dist.closures import Closure
from sassha_dist.distributed.deepspeed.partitions import Zero3Partitions, Zero12Partitions
from sassha_dist.hessian.finite_difference import DifferencePasses
from sassha_dist.passes import Backward, PassRunner, SteppingOptimizer
from sassha_dist.step import StepState


class ZeroPasses(PassRunner):
    """``engine.backward`` of every micro-batch, on ZeRO's fp32 partitions.

    Each pass sets the accumulation boundary on its last micro-batch, so the engine reduces the
    gradient into its partitions. The update reads the last pass's gradient from DeepSpeed's
    buffers (``engine.step()`` clips it and hands it to ``ZeroSassha.step``), so the perturbed
    pass comes after the finite differences; every other pass's gradient is copied out and the
    buffers cleared. Whenever the optimizer moves the partitions, the model's copy follows.
    """

    update_reads_last_pass = True

    def __init__(
        self,
        engine: Any,
        adapter: Zero12Partitions | Zero3Partitions,
        *,
        scale_wrt_gas: bool,
        compute_dtype: torch.dtype,
    ) -> None:
        self.engine, self.adapter = engine, adapter
        self.scale_wrt_gas, self._compute_dtype = scale_wrt_gas, compute_dtype

    def _backward(self, optimizer: SteppingOptimizer, closures: list[Closure]) -> torch.Tensor:
        """Forward/backward of every micro-batch through the engine; returns the summed (scaled) loss."""
        engine, total = self.engine, None
        last = len(closures) - 1
        for k, closure in enumerate(closures):
            engine.set_gradient_accumulation_boundary(k == last)
            loss = optimizer.evaluate_in_step(closure, k)
            scaled = engine.backward(loss, scale_wrt_gas=self.scale_wrt_gas).detach()
            total = scaled if total is None else total + scaled
        return total

    def _take_reduced(self) -> list[torch.Tensor]:
        """The reduced gradient, in buffers of our own; DeepSpeed's are cleared for the next pass."""
        grads = self.adapter.gradients()
        self.adapter.clear_gradients()
        return grads

    def gradient(self, optimizer: SteppingOptimizer, closures: list[Closure]) -> list[torch.Tensor]:
        """The reduced gradient at the current point (:meth:`_take_reduced`)."""
        self._backward(optimizer, closures)
        return self._take_reduced()

    def subtract_gradient(
        self, optimizer: SteppingOptimizer, closures: list[Closure], target: list[torch.Tensor]
    ) -> None:
        """Subtract the reduced gradient at the current point from ``target``, read in DeepSpeed's buffers."""
        self._backward(optimizer, closures)
        torch._foreach_sub_(target, self.adapter.gradients(owned=False))
        self.adapter.clear_gradients()

    def accumulate(
        self,
        optimizer: SteppingOptimizer,
        closures: list[Closure],
        params: list[torch.Tensor],
        backward: Backward | None = None,
    ) -> torch.Tensor:
        """The reduced gradient into the partitions' ``.grad`` (``params`` are the partitions)."""
        loss = self._backward(optimizer, closures)
        for flat, grad in zip(self.adapter.flats, self._take_reduced(), strict=True):
            flat.grad = grad
        return loss

    def last_pass(
        self, optimizer: SteppingOptimizer, closures: list[Closure]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = self._backward(optimizer, closures)
        return loss, self.adapter.gradients()

    def compute_dtype(self, params: list[torch.Tensor]) -> torch.dtype:
        return self._compute_dtype

    def difference_passes(
        self,
        optimizer: SteppingOptimizer,
        step: StepState,
        closures: list[Closure],
        gradient_at_point: list[torch.Tensor] | None,
    ) -> DifferencePasses:
        return _ZeroDifferences(self, optimizer, step.locals, closures)

    def parameters_moved(self) -> None:
        self.adapter.push_params()

    def step_started(self, optimizer: SteppingOptimizer, step: StepState) -> None:
        if [id(p) for p in step.params] != [id(f) for f in self.adapter.flats]:
            raise RuntimeError("ZeroSassha's parameter groups do not hold the engine's ZeRO partitions.")
        for flat in self.adapter.flats:
            flat.grad = None  # the gradient at theta is folded into the perturbation: free it

    def step_cancelled(self, moved: bool) -> None:
        """Clear DeepSpeed's gradients and resync the model (a collective at stages 1/2) if it moved."""
        try:
            for flat in self.adapter.flats:
                flat.grad = None
            self.adapter.clear_gradients()
        finally:
            if moved:
                self.adapter.push_params()


class _ZeroDifferences(DifferencePasses):
    """Finite differences through the engine, on ZeRO's fp32 partitions.

    ``w - hz`` is reached from ``w + hz``, as for autograd, and the second central gradient is
    subtracted straight from DeepSpeed's buffers. Unlike there, ``w`` is copied (``point``) and
    restored after each probe: the perturbed pass comes after the finite differences here, and
    its gradient must be taken at ``w`` exactly, not one rounding away from it. The forward
    scheme returns ``g(w + hz)`` and sums the probes: ``g(w)`` is the last pass's, subtracted
    afterwards (``StepState.forward_correction``).
    """

    def __init__(
        self,
        runner: ZeroPasses,
        optimizer: SteppingOptimizer,
        flats: list[torch.Tensor],
        closures: list[Closure],
    ) -> None:
        self.runner, self.optimizer, self.flats, self.closures = runner, optimizer, flats, closures
        self.point = [f.detach().clone() for f in flats]
        self.probe_sum = []

    def _move(self, signs: list[torch.Tensor], h: float) -> None:
        """Partitions (and the model's copy) to ``flats + h z``."""
        torch._foreach_add_(self.flats, signs, alpha=h)
        self.runner.parameters_moved()

    def _gradient_at_moved(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        """The gradient at ``flats + h z`` (moving the partitions there), in buffers of our own."""
        self._move(signs, h)
        with torch.enable_grad():
            return self.runner.gradient(self.optimizer, self.closures)

    def central(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        difference = self._gradient_at_moved(signs, h)
        self._move(signs, -2.0 * h)
        with torch.enable_grad():
            self.runner.subtract_gradient(self.optimizer, self.closures, difference)
        torch._foreach_copy_(self.flats, self.point)  # back to w exactly, for the next probe or the last pass
        return difference

    def forward(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        difference = self._gradient_at_moved(signs, h)
        if not self.probe_sum:
            self.probe_sum = [torch.zeros_like(f) for f in self.flats]
        torch._foreach_add_(self.probe_sum, signs)
        torch._foreach_copy_(self.flats, self.point)
        return difference
