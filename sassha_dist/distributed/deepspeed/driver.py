"""SasshaDeepSpeed: one SASSHA step through the engine, with finite differences on the partitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from sassha_dist import state_keys as keys
from sassha_dist.closures import Closure, as_closures
from sassha_dist.distributed.deepspeed.config import check_config
from sassha_dist.distributed.deepspeed.optimizer import UpdatePlan, ZeroSassha
from sassha_dist.distributed.deepspeed.partitions import Zero3Partitions, Zero12Partitions
from sassha_dist.distributed.deepspeed.passes import ZeroPasses
from sassha_dist.step import StepReport, StepState


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
            self.adapter: Zero12Partitions | Zero3Partitions = Zero3Partitions(zero, strategy)
        elif isinstance(zero, DeepSpeedZeroOptimizer):
            if zero.cpu_offload:
                raise ValueError("ZeRO offload is not supported: remove zero_optimization.offload_optimizer.")
            self.adapter = Zero12Partitions(zero, strategy)
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
        self.passes = ZeroPasses(
            engine, self.adapter, scale_wrt_gas=self.scale_wrt_gas, compute_dtype=self.compute_dtype
        )

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
                loss = opt.run_passes(closures, self.passes)  # cancels the step itself on any error
                pending = opt.current_step
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

    def _engine_update(self, pending: StepState) -> None:
        """``engine.step()``: DeepSpeed clips the perturbed gradient, calls ZeroSassha.step per partition."""
        opt, engine = self.optimizer, self.engine
        plan = UpdatePlan(pending, opt.counters[keys.GLOBAL_STEP] + 1, set())
        opt.plan = plan
        engine.set_gradient_accumulation_boundary(True)
        try:
            engine.step()
        except BaseException:
            self._restore_not_updated(plan)
            raise
        finally:
            opt.plan = None
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
    def _restore_not_updated(self, plan: UpdatePlan) -> None:
        """Put theta back into the partitions ZeroSassha.step() did not reach, and resync the model."""
        pending = plan.pending
        for p, theta in zip(pending.params, pending.theta, strict=True):
            if id(p) not in plan.done:
                p.copy_(theta)
        self.adapter.push_params()

    # -- helpers --------------------------------------------------------------------------

    def _all_finite(self, checks: list[tuple[str, torch.Tensor]]) -> bool:
        flags = torch.stack([flag.reshape(()).to(torch.int32) for _, flag in checks])
        return bool(self.optimizer.strategy.all_true(flags).all())
