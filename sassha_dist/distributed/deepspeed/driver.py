"""SasshaDeepSpeed: one SASSHA step through the engine, with finite differences on the partitions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from sassha_dist import state_keys as keys
from sassha_dist.closures import as_closures
from sassha_dist.distributed.deepspeed.config import check_config
from sassha_dist.distributed.deepspeed.optimizer import ZeroSassha, _UpdatePlan
from sassha_dist.distributed.deepspeed.partitions import _Zero3, _Zero12
from sassha_dist.functional import sq_norm
from sassha_dist.hessian.finite_difference import (
    DifferencePasses,
    difference_weight,
    hutchinson_by_differences,
)
from sassha_dist.hessian.hvp import (
    curvature_underflow,
    default_fd_step,
    finite_difference_step,
)
from sassha_dist.options import FD_CENTRAL, PERTURB_MOMENTUM
from sassha_dist.step import StepReport, StepState

Closure = Callable[[], torch.Tensor]


class SasshaDeepSpeed:
    """One SASSHA training step per :meth:`step` call on a ``deepspeed.initialize`` engine.

    Args:
        engine: a ``DeepSpeedEngine`` (ZeRO stage 1, 2 or 3) built with a
            :class:`ZeroSassha` optimizer.
        scale_wrt_gas: ``engine.backward``'s argument of the same name. ``True``
            (DeepSpeed's default): DeepSpeed divides each micro-batch loss by
            ``G``, so ``step`` needs exactly ``G`` closures. ``False``: the
            closures return losses already scaled for accumulation (as the
            Hugging Face Trainer computes them), and ``step`` takes any number
            of them (a window cut short at the end of an epoch).

    ``step(closure)`` takes a closure that computes the loss of the step's
    batch through the engine (``engine(inputs)``) and returns it without
    calling ``backward``; with ``gradient_accumulation_steps = G`` pass a list
    of ``G`` closures, one per micro-batch, each returning that micro-batch's
    loss as one would pass it to ``engine.backward`` (DeepSpeed divides by
    ``G``). It returns the loss at :math:`\\theta` (mean over micro-batches;
    with ``scale_wrt_gas=False`` the sum of the closures' losses), detached.
    Each closure is called 2 times per step, plus 2 per probe (central) or 1
    (forward) on Hessian steps. Do not call ``engine.backward`` or
    ``engine.step`` yourself.
    """

    def __init__(self, engine: Any, *, scale_wrt_gas: bool = True) -> None:
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if not isinstance(engine, DeepSpeedEngine):
            raise TypeError(f"SasshaDeepSpeed needs a DeepSpeedEngine, got {type(engine).__name__}.")
        if type(engine).__name__ == "PipelineEngine":
            raise ValueError("Pipeline parallelism is not supported: SASSHA needs whole-model passes.")
        param_dict = getattr(engine._config, "_param_dict", None)
        if isinstance(param_dict, dict):
            check_config(param_dict)
        zero = engine.optimizer
        inner = getattr(zero, "optimizer", None)
        if not isinstance(inner, ZeroSassha):
            raise ValueError(
                f"The engine's optimizer is {type(inner or zero).__name__}, not ZeroSassha: remove any "
                "'optimizer' block from the DeepSpeed config and pass optimizer=ZeroSassha(params, ...) to "
                "deepspeed.initialize (or use sassha_dist.distributed.deepspeed.initialize)."
            )
        if engine.fp16_enabled():
            raise ValueError('fp16 is not supported: use "bf16": {"enabled": true} or fp32.')
        strategy = inner.strategy
        if isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
            if zero.offload_optimizer or zero.offload_param:
                raise ValueError("ZeRO-3 offload is not supported: remove offload_optimizer / offload_param.")
            self.adapter: _Zero12 | _Zero3 = _Zero3(zero, strategy)
        elif isinstance(zero, DeepSpeedZeroOptimizer):
            if zero.cpu_offload:
                raise ValueError("ZeRO offload is not supported: remove zero_optimization.offload_optimizer.")
            self.adapter = _Zero12(zero, strategy)
        else:
            raise ValueError(
                f"The engine wraps its optimizer in {type(zero).__name__}: SasshaDeepSpeed needs ZeRO stage "
                "1, 2 or 3 (for stage 1 with bf16, drop data_types.grad_accum_dtype=fp32)."
            )
        self.engine = engine
        self.optimizer: ZeroSassha = inner
        self.scale_wrt_gas = bool(scale_wrt_gas)
        self.stage = int(engine.zero_optimization_stage())
        # The dtype the passes compute in, which sets the default finite-difference step.
        self.compute_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        if getattr(engine, "torch_autocast_enabled", lambda: False)():
            self.compute_dtype = engine.torch_autocast_dtype()

    @property
    def last_report(self) -> StepReport:
        return self.optimizer.last_report

    @torch.no_grad()
    def hessian_stats(self) -> dict[str, float]:
        """Mean and max of the bias-uncorrected ``D`` over the whole model (all ranks, padding excluded).

        A collective (two all-reduces over the data-parallel group): call it on every rank.
        """
        opt = self.optimizer
        device = self.adapter.flats[0].device  # the collective's device (NCCL needs the GPU's)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of D, element count
        peak = torch.full((1,), float("-inf"), dtype=torch.float64, device=device)
        for flat, padding in zip(self.adapter.flats, self.adapter.paddings, strict=True):
            state = opt.state.get(flat, {})
            if keys.HESSIAN_DIAG not in state:
                continue
            real = state[keys.HESSIAN_DIAG].reshape(-1)[~padding]
            if real.numel():
                total[0] += real.sum(dtype=torch.float64)
                total[1] += real.numel()
                peak = torch.maximum(peak, real.max().to(torch.float64).reshape(1))
        group = opt.strategy.group
        dist.all_reduce(total, group=group)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        if total[1] == 0:
            return {"hessian_mean": 0.0, "hessian_max": 0.0}
        return {"hessian_mean": float(total[0] / total[1]), "hessian_max": float(peak)}

    # -- the step -------------------------------------------------------------------------

    def step(self, closure: Closure | Sequence[Closure]) -> torch.Tensor:
        closures = as_closures(closure)
        accumulation = self.engine.gradient_accumulation_steps()
        if self.scale_wrt_gas and len(closures) != accumulation:
            raise ValueError(
                f"Got {len(closures)} closure(s) for gradient_accumulation_steps={accumulation}: pass one "
                "closure per micro-batch of the step."
            )
        opt, engine = self.optimizer, self.engine
        if opt.in_step:
            raise RuntimeError("A step is already in progress on this optimizer.")
        boundary = engine._is_gradient_accumulation_boundary
        try:
            with self.adapter.flats_in_groups():
                try:
                    loss, pending = self._passes(closures)
                except BaseException:
                    self._abort()
                    raise
                if not self._all_finite(pending.checks):
                    # Sassha's own skip path: restores theta, counts the skip (or raises).
                    self.adapter.clear_gradients()
                    try:
                        opt.update()
                    finally:
                        self.adapter.push_params()
                    return loss
                opt.detach_step()
            self._engine_update(pending)
        finally:
            engine._is_gradient_accumulation_boundary = boundary
        return loss

    def _passes(self, closures: list[Closure]) -> tuple[torch.Tensor, StepState]:
        """Passes 1-4: gradient at theta, perturbation, Hessian, perturbed gradient (left in DeepSpeed)."""
        opt = self.optimizer
        opt.begin_passes()
        if opt.one_pass_due():
            return self._one_pass(closures)
        loss = self._pass(closures, set_grads=True)
        opt.perturb(loss)
        pending = opt.current_step
        if [id(p) for p in pending.params] != [id(f) for f in self.adapter.flats]:
            raise RuntimeError("ZeroSassha's parameter groups do not hold the engine's ZeRO partitions.")
        for flat in self.adapter.flats:
            flat.grad = None
        self.adapter.push_params()
        forward = self._hessian(pending, closures) if pending.hessian_due else None
        perturbed_loss, perturbed = self._pass(closures, keep=True)
        pending.report.perturbed_loss = perturbed_loss
        pending.checks.append(("perturbed loss", torch.isfinite(perturbed_loss)))
        pending.checks.append(("perturbed gradient", self._finite(perturbed)))
        self._finish_estimates(pending, forward, perturbed)
        return loss, pending

    def _one_pass(self, closures: list[Closure]) -> tuple[torch.Tensor, StepState]:
        """One pass: rho = 0 in every group, or the momentum ascent (``perturbation="momentum"``).

        The ascent (if any) moves the partitions to w~ and the model's copy with them; then the
        finite differences at that point on Hessian steps, then the one pass. It comes last, so
        its reduced gradient stays in DeepSpeed's buffers for ``engine.step()``, as the perturbed
        pass does on other steps.
        """
        opt = self.optimizer
        if opt.options.perturbation == PERTURB_MOMENTUM:
            opt.ascend(self.adapter.flats)
            self.adapter.push_params()
        opt.start_step(*opt.members(every=True), None, one_pass=True, gradients=False)
        pending = opt.current_step
        if [id(p) for p in pending.params] != [id(f) for f in self.adapter.flats]:
            raise RuntimeError("ZeroSassha's parameter groups do not hold the engine's ZeRO partitions.")
        forward = self._hessian(pending, closures) if pending.hessian_due else None
        loss, grads = self._pass(closures, keep=True)
        report = pending.report
        report.loss = report.perturbed_loss = loss
        report.grad_norm = opt.strategy.sum_scalar(sq_norm(grads, foreach=opt.options.foreach)).sqrt()
        pending.checks.append(("loss", torch.isfinite(loss)))
        pending.checks.append(("gradient", torch.isfinite(report.grad_norm)))
        self._finish_estimates(pending, forward, grads)
        return loss, pending

    def _finish_estimates(self, pending: StepState, forward, grad_at_point: list[torch.Tensor]) -> None:
        """Complete forward differences with the gradient at the point, then check the estimate."""
        if forward is not None:
            # Forward differences: sum_s z_s * (g(w + h z_s) - g(w)) / (h S), g(w) known only now.
            probe_sum, weight = forward
            for est, z_sum, grad in zip(pending.estimates, probe_sum, grad_at_point, strict=True):
                est.addcmul_(z_sum, grad, value=-weight)
        if pending.estimates is not None:
            pending.report.hessian_underflow = curvature_underflow(pending.estimates, grad_at_point)
            pending.checks.append(("Hessian estimate", self._finite(pending.estimates)))

    def _engine_update(self, pending: StepState) -> None:
        """``engine.step()``: DeepSpeed clips the perturbed gradient, calls ZeroSassha.step per partition."""
        opt, engine = self.optimizer, self.engine
        plan = _UpdatePlan(pending, opt.counters[keys.GLOBAL_STEP] + 1, set())
        opt._plan = plan
        engine.set_gradient_accumulation_boundary(True)
        try:
            engine.step()
        except BaseException:
            self._restore_not_updated(plan)
            raise
        finally:
            opt._plan = None
        # engine.step() counts one micro-step; a ZeRO step covers gradient_accumulation_steps of them.
        engine.micro_steps += engine.gradient_accumulation_steps() - 1
        opt.end_passes()
        opt.last_report = pending.report
        if len(plan.done) < len(pending.params):
            # DeepSpeed skipped the update (it saw an overflow): nothing was updated.
            self._restore_not_updated(plan)
            opt.counters[keys.SKIPPED_STEPS] += 1
            pending.report.skipped, pending.report.reason = True, "DeepSpeed skipped the update (overflow)"
            return
        opt.counters[keys.GLOBAL_STEP] += 1
        if pending.hessian_due:
            opt.counters[keys.HESSIAN_REFRESHES] += 1
            pending.report.hessian_refreshed = True
            opt.warn_on_underflow(pending.report)

    @torch.no_grad()
    def _restore_not_updated(self, plan: _UpdatePlan) -> None:
        """Put theta back into the partitions ZeroSassha.step() did not reach, and resync the model."""
        pending = plan.pending
        for p, theta in zip(pending.params, pending.theta, strict=True):
            if id(p) not in plan.done:
                p.copy_(theta)
        self.adapter.push_params()

    # -- passes ---------------------------------------------------------------------------

    def _pass(
        self,
        closures: list[Closure],
        *,
        set_grads: bool = False,
        keep: bool = False,
        subtract_from: list[torch.Tensor] | None = None,
    ):
        """Forward/backward of every micro-batch through the engine; returns the loss and the gradients.

        ``keep``: leave the reduced gradient in DeepSpeed's buffers for ``engine.step()``.
        ``subtract_from``: subtract the reduced gradient from these tensors in place, read straight
        from DeepSpeed's buffers (no copy), and return no gradients.
        """
        engine, total = self.engine, None
        last = len(closures) - 1
        for k, closure in enumerate(closures):
            engine.set_gradient_accumulation_boundary(k == last)
            loss = self.optimizer.evaluate_in_step(closure, k)
            scaled = engine.backward(loss, scale_wrt_gas=self.scale_wrt_gas).detach()
            total = scaled if total is None else total + scaled
        grads = None
        if subtract_from is None:
            grads = self.adapter.gradients()
        else:
            torch._foreach_sub_(subtract_from, self.adapter.gradients(owned=False))
        if not keep:
            self.adapter.clear_gradients()
        if set_grads:
            for flat, g in zip(self.adapter.flats, grads, strict=True):
                flat.grad = g
            return total
        return total, grads

    @torch.no_grad()
    def _hessian(self, pending: StepState, closures: list[Closure]):
        """Finite-difference Hutchinson estimate at ``w = theta + eps`` into ``pending.estimates``.

        Returns ``(sum of probes, weight)`` for the forward scheme, which still
        needs the perturbed gradient, or ``None``.

        As in ``Sassha.hessian_pass``, the estimate forms in place in the first gradient's buffer,
        the probe is held as int8 signs, and ``w - hz`` is reached from ``w + hz``. Unlike there,
        ``w`` is copied: the perturbed pass comes after the finite differences here, and its
        gradient must be taken at ``w`` exactly, not one rounding away from it.
        """
        opt, flats = self.optimizer, pending.locals
        options = opt.options
        point = [f.detach().clone() for f in flats]
        point_norm = float(opt.strategy.sum_scalar(sq_norm(point, foreach=options.foreach)).sqrt())
        fd_step = options.fd_step if options.fd_step is not None else default_fd_step(self.compute_dtype)
        h = finite_difference_step(fd_step, point_norm, opt.strategy.num_elements)
        central = options.fd_scheme == FD_CENTRAL
        passes = _ZeroDifferences(self, flats, point, closures)
        pending.estimates = hutchinson_by_differences(
            passes,
            lambda sample: self._probes(flats, sample),
            h=h,
            central=central,
            n_samples=options.n_samples,
        )
        self.adapter.push_params()
        if central:
            return None
        return passes.probe_sum, difference_weight(h, central=False, n_samples=options.n_samples)

    def _probes(self, flats: list[torch.Tensor], sample: int) -> list[torch.Tensor]:
        """Global probe ``sample`` on each partition as int8 signs, zero on ZeRO's padding."""
        opt = self.optimizer
        segments = [opt.strategy.probe_segments(flat, index) for index, flat in enumerate(flats)]
        return opt.draw_probes(flats, segments, sample, torch.int8)

    # -- helpers --------------------------------------------------------------------------

    def _finite(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.isfinite(sq_norm(tensors, foreach=self.optimizer.options.foreach))

    def _all_finite(self, checks: list[tuple[str, torch.Tensor]]) -> bool:
        flags = torch.stack([flag.reshape(()).to(torch.int32) for _, flag in checks])
        return bool(self.optimizer.strategy.all_true(flags).all())

    def _abort(self) -> None:
        """Undo a failed step: restore theta, clear DeepSpeed's gradients, resync the model.

        The resync (a collective at stages 1/2) only runs once the parameters have moved.
        """
        moved = self.optimizer.in_step
        try:
            self.optimizer.cancel()
            for flat in self.adapter.flats:
                flat.grad = None
            self.adapter.clear_gradients()
        finally:
            if moved:
                self.adapter.push_params()


class _ZeroDifferences(DifferencePasses):
    """Finite differences through the engine, on ZeRO's fp32 partitions.

    ``w - hz`` is reached from ``w + hz``, as ``Sassha.hessian_pass`` does, and the second
    central gradient is subtracted straight from DeepSpeed's buffers. Unlike there, ``w`` is
    copied (``point``) and restored after each probe: the perturbed pass comes after the finite
    differences here, and its gradient must be taken at ``w`` exactly. The forward scheme returns
    ``g(w + hz)`` and sums the probes: ``g(w)`` is the last pass's, subtracted afterwards.
    """

    def __init__(
        self,
        driver: SasshaDeepSpeed,
        flats: list[torch.Tensor],
        point: list[torch.Tensor],
        closures: list[Closure],
    ) -> None:
        self.driver, self.flats, self.point, self.closures = driver, flats, point, closures
        self.probe_sum: list[torch.Tensor] = []

    def _move(self, signs: list[torch.Tensor], h: float) -> None:
        """Partitions (and the model's copy) to ``flats + h z``."""
        torch._foreach_add_(self.flats, signs, alpha=h)
        self.driver.adapter.push_params()

    def _gradient_at_moved(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        """The gradient at ``flats + h z`` (moving the partitions there), in buffers of our own."""
        self._move(signs, h)
        with torch.enable_grad():
            _, grads = self.driver._pass(self.closures)
        return grads

    def central(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        difference = self._gradient_at_moved(signs, h)
        self._move(signs, -2.0 * h)
        with torch.enable_grad():
            self.driver._pass(self.closures, subtract_from=difference)
        torch._foreach_copy_(self.flats, self.point)  # back to w exactly, for the next probe or the last pass
        return difference

    def forward(self, signs: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        difference = self._gradient_at_moved(signs, h)
        if not self.probe_sum:
            self.probe_sum = [torch.zeros_like(f) for f in self.flats]
        torch._foreach_add_(self.probe_sum, signs)
        torch._foreach_copy_(self.flats, self.point)
        return difference
