r"""DeepSpeed ZeRO stages 1, 2 and 3: SASSHA on ZeRO's flat fp32 partitions.

Three pieces, used together::

    deepspeed.init_distributed(dist_backend="gloo")      # "nccl" on GPUs
    engine, sassha = sassha_dist.distributed.deepspeed.initialize(model, "zero2.json", lr=0.1, rho=0.05)
    for batch in loader:
        loss = sassha.step(lambda: loss_fn(engine(batch)))   # one call per training step

or, by hand: ``deepspeed.initialize(model=model, optimizer=ZeroSassha(model.parameters(), ...),
config=config)`` then ``SasshaDeepSpeed(engine)``; with accelerate's DeepSpeed plugin,
``accelerator.prepare(model, ZeroSassha(...), loader)`` then ``SasshaDeepSpeed(engine)``. The Hugging
Face Trainer does all of this itself: ``SasshaTrainer`` with ``--optim sassha --deepspeed config.json``
(:mod:`sassha_dist.integrations.transformers`), whose closures are already scaled for gradient
accumulation (``SasshaDeepSpeed(engine, scale_wrt_gas=False)``).

* :class:`ZeroSassha` is the optimizer DeepSpeed wraps (its "client optimizer").
  DeepSpeed replaces its parameters with this rank's flat 1-D fp32 partitions
  (stages 1/2: one per parameter group, permanently; stage 3: one per
  sub-group, swapped in only while ``step()`` runs), so ``m`` and ``D`` are
  created on those partitions: each rank holds 1/W of the optimizer state.
  Its ``step()`` is only DeepSpeed's call into the *update*: it applies the
  pending update to the partitions DeepSpeed hands it, which is once per
  group (stages 1/2) or once per sub-group (stage 3); everything that must
  happen once per training step (counters, Hessian schedule, probe index)
  is decided by the driver before and settled after.
* :class:`DeepSpeedZero` is the :class:`~sassha_dist.distributed.Strategy`: the
  partitions are local tensors, scalars are summed over the data-parallel group,
  and :meth:`~DeepSpeedZero.probe_segments` maps each partition's element ranges
  to ``(parameter ordinal, element offset)`` of the original parameters, so each
  rank generates exactly its part of one model-wide (global) probe.
* :class:`SasshaDeepSpeed` drives one training step through the engine:

  1. gradient at :math:`\theta`: the closures' losses through ``engine.backward``
     (every micro-batch of the step, the last one at the accumulation boundary);
     the reduced gradient partition is read where DeepSpeed's own ``step()``
     would read it (stages 1/2: ``averaged_gradients[i]`` / the pre-flattened
     fp32 partition buffer, flattened and padded as ``step()`` does; stage 3:
     ``averaged_gradients[sub_group]``), copied, and DeepSpeed's gradient state
     is cleared exactly as its overflow-skip path does. DeepSpeed never steps.
  2. :math:`\epsilon = \rho g / \lVert g\rVert` on the fp32 partitions (the norm is
     one scalar all-reduce), written to the model: stages 1/2 copy the fp32
     partition into the low-precision partition and all-gather
     (``update_lp_params``); stage 3 copies it into the partitioned parameters
     (``ds_tensor``) and re-gathers persistent parameters.
  3. on Hessian steps, central (or forward) finite differences at
     :math:`w = \theta+\epsilon` along global probes, each gradient read and
     cleared as in 1; :math:`h = h_0 \lVert w\rVert / \lVert z\rVert` over the
     whole model (padding excluded).
  4. the perturbed pass at :math:`w`, last, so its reduced gradient stays in
     DeepSpeed's buffers; then ``engine.step()``: DeepSpeed clips it (if
     ``gradient_clipping``), calls ``ZeroSassha.step()`` per partition, which
     restores :math:`\theta` exactly and applies the update with ``m`` and ``D``
     there, copies fp32 to the model parameters, steps the LR scheduler and
     counts the step.

  A step whose loss, gradients or Hessian estimate are non-finite is skipped
  (parameters restored, state untouched, ``engine.step()`` not called).

``gradient_clipping`` clips the perturbed gradient :math:`\tilde g` (the one that
enters ``m``) by its global norm, after the perturbation. The gradient at
:math:`\theta` is not clipped (:math:`\epsilon` only depends on its direction) and
neither are the finite-difference gradients (clipping them would bias :math:`H z`).

Checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` store the inner
optimizer's ``state_dict()``, which carries ``m``, ``D``, per-partition step
counts and the optimizer-wide counters (global step, Hessian refreshes = probe
position, skipped steps); a resumed run continues as if uninterrupted.
The checkpoint is DeepSpeed's rigid format (resume with the same data-parallel
world size). DeepSpeed's universal checkpoints only know Adam's state keys:
``ds_to_universal`` fails on a SASSHA checkpoint with ``KeyError: 'exp_avg'``,
loading one is refused, and :func:`to_universal` raises saying so.

Unsupported (each refused by :func:`check_config` with the fix): an ``optimizer``
block in the config, fp16, ZeRO stage 0, optimizer/parameter offload, the
``BF16_Optimizer`` path (stage 1 + bf16 + fp32 gradient accumulation), elastic
checkpoints, ``managed_gradient_accumulation: false``, ZenFlow, pipeline
parallelism, loading universal checkpoints.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sassha_dist import state_keys as keys
from sassha_dist.distributed.strategy import ProbeSegment, Strategy, all_reduce_sum
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
from sassha_dist.optimizer import FD_CENTRAL, Sassha, _as_closures
from sassha_dist.step import StepReport, StepState

__all__ = [
    "DeepSpeedZero",
    "SasshaDeepSpeed",
    "ZeroSassha",
    "check_config",
    "initialize",
    "to_universal",
]

Closure = Callable[[], torch.Tensor]


# ------------------------------------------------------------------------------------ config


def _load_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if not isinstance(config, dict):
        raise TypeError(
            f"Invalid DeepSpeed config of type {type(config).__name__}: pass a dict or a JSON path."
        )
    return copy.deepcopy(config)


def _enabled(block: Any) -> bool:
    return isinstance(block, dict) and bool(block.get("enabled", False))


def _offload_device(block: Any) -> str:
    if not isinstance(block, dict):
        return "none"
    return str(block.get("device", "none")).lower()


def check_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Validate a DeepSpeed config for SASSHA; return a copy with ``zero_allow_untested_optimizer`` set.

    Raises ``ValueError`` naming the fix for every setting that conflicts with
    SASSHA's two-pass step or with its checkpoints.
    """
    config = _load_config(config)
    problems = []
    if "optimizer" in config:
        problems.append(
            "the config has an 'optimizer' block: SASSHA is the client optimizer, so remove the block and "
            "pass optimizer=ZeroSassha(params, ...) to deepspeed.initialize (or use "
            "sassha_dist.distributed.deepspeed.initialize); with accelerate, pass a ZeroSassha to "
            "accelerator.prepare instead of accelerate's DummyOptim"
        )
    zero = config.get("zero_optimization")
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if stage not in (1, 2, 3):
        problems.append(
            f"zero_optimization.stage is {stage}: SasshaDeepSpeed needs ZeRO stage 1, 2 or 3 (set "
            '"zero_optimization": {"stage": 1|2|3}); without ZeRO use plain Sassha under DDP'
        )
    autocast = config.get("torch_autocast")
    autocast_dtype = str(autocast.get("dtype", "")).lower() if _enabled(autocast) else ""
    autocast_fp16 = autocast_dtype in ("fp16", "float16", "half", "torch.float16")
    if _enabled(config.get("fp16")) or autocast_fp16:
        problems.append(
            "fp16 is enabled: dynamic loss scaling would skip and rescale the passes of one step "
            'independently; use "bf16": {"enabled": true} (or fp32)'
        )
    if isinstance(zero, dict):
        for key in ("offload_optimizer", "offload_param"):
            device = _offload_device(zero.get(key))
            if device not in ("none", ""):
                problems.append(
                    f"zero_optimization.{key}.device is {device!r}: SASSHA reads and rewrites the "
                    "gradient and parameter partitions between passes, which offloaded (swapped) "
                    f"partitions do not allow; remove zero_optimization.{key}"
                )
        if zero.get("elastic_checkpoint", False):
            problems.append(
                "zero_optimization.elastic_checkpoint is true: elastic checkpoints keep only per-group "
                "tensor state and drop SASSHA's counters; set it to false"
            )
        if zero.get("zenflow"):
            problems.append("zero_optimization.zenflow is set: ZenFlow has its own update loop; remove it")
    precision = config.get("data_types", {}) if isinstance(config.get("data_types"), dict) else {}
    if (
        stage == 1
        and _enabled(config.get("bf16"))
        and str(precision.get("grad_accum_dtype", "")).lower() in ("fp32", "float32", "float")
    ):
        problems.append(
            "ZeRO stage 1 with bf16 and data_types.grad_accum_dtype=fp32 runs DeepSpeed's BF16_Optimizer, "
            "which SasshaDeepSpeed does not drive; drop grad_accum_dtype or use stage 2"
        )
    if config.get("managed_gradient_accumulation", True) is False:
        problems.append(
            "managed_gradient_accumulation is false: SasshaDeepSpeed sets the accumulation boundary of "
            "every pass itself; remove the setting"
        )
    if isinstance(config.get("checkpoint"), dict) and config["checkpoint"].get("load_universal", False):
        problems.append(
            "checkpoint.load_universal is true: DeepSpeed's universal checkpoints only carry Adam's "
            "state, not SASSHA's; resume from the original checkpoint"
        )
    pipeline_stages = config["pipeline"].get("stages", 1) if isinstance(config.get("pipeline"), dict) else 1
    if isinstance(pipeline_stages, int) and pipeline_stages > 1:
        problems.append("pipeline parallelism is not supported: SASSHA needs whole-model passes")
    if problems:
        raise ValueError("Invalid DeepSpeed config for SASSHA:\n  - " + "\n  - ".join(problems))
    config["zero_allow_untested_optimizer"] = True
    return config


# ------------------------------------------------------------------------------------ strategy


class DeepSpeedZero(Strategy):
    """ZeRO's flat fp32 partitions as SASSHA's local tensors.

    Built unbound by :class:`ZeroSassha` (which records each original
    parameter's ordinal); :class:`SasshaDeepSpeed` binds it to the engine's
    ZeRO optimizer, which fixes the partitions, their probe segments and the
    data-parallel group.
    """

    supports_exact_hessian = False
    prefers_exact_hessian = False
    supports_local_gradients = False
    global_probes_only = True

    def __init__(self) -> None:
        self.ordinals: dict[int, int] = {}
        self._params: list[torch.Tensor] = []
        self.segments: dict[int, list[ProbeSegment]] = {}
        self.group: dist.ProcessGroup | None = None
        self.num_elements = 0
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def record(self, params: Sequence[torch.Tensor]) -> None:
        """Remember the ordinal of each original parameter (Sassha's probe ``param_index``)."""
        self._params = list(params)
        self.ordinals = {id(p): i for i, p in enumerate(self._params)}

    def ordinal(self, param: torch.Tensor) -> int:
        try:
            return self.ordinals[id(param)]
        except KeyError:
            raise ValueError(
                "DeepSpeed manages a parameter that the ZeroSassha optimizer was not built with: build it "
                "from the same parameters as the model given to deepspeed.initialize."
            ) from None

    def bind(self, segments: dict[int, list[ProbeSegment]], group: dist.ProcessGroup | None) -> None:
        self.segments = segments
        self.group = group
        self.rank = dist.get_rank()
        count = torch.tensor(
            float(sum(s.length for segs in segments.values() for s in segs)), dtype=torch.float64
        )
        dist.all_reduce(count, group=group)
        self.num_elements = round(float(count))

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        raise RuntimeError(
            "Under DeepSpeed the passes run through the engine: call SasshaDeepSpeed(engine).step(closure) "
            "instead of the optimizer's own passes."
        )

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(value, self.group)

    def probe_segments(self, param: torch.Tensor, param_index: int) -> list[ProbeSegment]:
        try:
            return self.segments[id(param)]
        except KeyError:
            raise RuntimeError(
                "DeepSpeedZero is not bound to this partition: build SasshaDeepSpeed(engine) after "
                "deepspeed.initialize and run steps through it."
            ) from None


# ------------------------------------------------------------------------------------ optimizer


@dataclass
class _UpdatePlan:
    """The step's pending passes, applied partition by partition from inside ``engine.step()``."""

    pending: StepState
    global_step: int
    done: set[int]


class ZeroSassha(Sassha):
    """:class:`~sassha_dist.Sassha` as DeepSpeed's client optimizer (ZeRO stages 1, 2, 3).

    Takes Sassha's arguments. Hessians come from finite differences with global
    probes (double backward does not work under ZeRO). Train with
    :class:`SasshaDeepSpeed`; this optimizer's ``step()`` is only DeepSpeed's
    call into the update, made from ``engine.step()``.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *args: Any, **kwargs: Any):
        strategy = kwargs.pop("strategy", None) or DeepSpeedZero()
        if not isinstance(strategy, DeepSpeedZero):
            raise ValueError(f"ZeroSassha needs a DeepSpeedZero strategy, got {type(strategy).__name__}.")
        super().__init__(params, *args, strategy=strategy, **kwargs)  # refuses per-rank probes
        strategy.record(self._all_params())
        self._plan: _UpdatePlan | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_plan", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__["_plan"] = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """DeepSpeed's call into the update, for the partitions now in ``param_groups``."""
        plan = self._plan
        if closure is not None or plan is None:
            raise RuntimeError(
                "ZeroSassha.step() is called by engine.step() inside SasshaDeepSpeed.step(closure); train "
                "with sassha = SasshaDeepSpeed(engine); sassha.step(closure) instead of engine.step() or "
                "optimizer.step()."
            )
        pending = plan.pending
        position = {id(p): i for i, p in enumerate(pending.params)}
        members, group_indices = [], []
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                index = position.get(id(p))
                if index is None:
                    raise RuntimeError(
                        "DeepSpeed handed ZeroSassha a partition that took no part in the step."
                    )
                members.append(index)
                group_indices.append(group_index)
        if not members:
            return
        share = pending.subset(members, group_indices)
        if share.theta:
            torch._foreach_copy_(share.locals, share.theta)  # the exact restore of theta
        # The optimizer-wide counters stay as they were: SasshaDeepSpeed settles them once.
        self.apply_update(share, plan.global_step)
        plan.done.update(id(p) for p in share.params)


# ------------------------------------------------------------------------------------ engine adapters


def _padding_mask(flat: torch.Tensor, segments: list[ProbeSegment]) -> torch.Tensor:
    """True on ZeRO's padding of a partition, False on the elements that belong to a parameter."""
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    for seg in segments:
        mask[seg.local_start : seg.local_start + seg.length] = False
    return mask


@torch.no_grad()
def _zero_padding(flats: list[torch.Tensor], paddings: list[torch.Tensor]) -> None:
    """Zero the padding of the fp32 partitions once: SASSHA then keeps it at zero (zero gradient,
    zero probe), so norms over whole partitions are norms over the parameters."""
    for flat, padding in zip(flats, paddings, strict=True):
        flat.masked_fill_(padding, 0.0)


class _Zero12:
    """Stages 1 and 2 (``DeepSpeedZeroOptimizer``): one fp32 partition per parameter group."""

    def __init__(self, zero: Any, strategy: DeepSpeedZero) -> None:
        self.zero = zero
        self.flats: list[torch.Tensor] = list(zero.single_partition_of_fp32_groups)
        segments: dict[int, list[ProbeSegment]] = {}
        for i, flat in enumerate(self.flats):
            group = zero.real_dp_process_group[i]
            size = int(zero.partition_size[i])
            start = dist.get_rank(group=group) * size
            if flat.numel() != size:
                raise RuntimeError(f"Unexpected ZeRO partition of {flat.numel()} elements (expected {size}).")
            segs = []
            for p, meta, offset in zip(
                zero.round_robin_bit16_groups[i],
                zero.round_robin_bit16_meta[i],
                zero.round_robin_bit16_offsets[i],
                strict=True,
            ):
                lo, hi = max(offset, start), min(offset + meta.numel(), start + size)
                if lo < hi:
                    segs.append(ProbeSegment(lo - start, hi - lo, strategy.ordinal(p), lo - offset))
            segments[id(flat)] = segs
        self.paddings = [_padding_mask(flat, segments[id(flat)]) for flat in self.flats]
        _zero_padding(self.flats, self.paddings)
        groups = {id(g) for g in zero.real_dp_process_group}
        if len(groups) != 1:
            raise NotImplementedError(
                "Parameter groups on different data-parallel groups (MoE) are not supported."
            )
        strategy.bind(segments, zero.dp_process_group)

    @contextmanager
    def flats_in_groups(self):
        yield

    def gradients(self, owned: bool = True) -> list[torch.Tensor]:
        """The reduced gradient partitions, formed as ``DeepSpeedZeroOptimizer.step`` does.

        ``owned=False`` may return views of DeepSpeed's buffers, valid until the next pass.
        """
        zero, out = self.zero, []
        for i, flat in enumerate(self.flats):
            group = zero.real_dp_process_group[i]
            grad = zero._get_preflattened_grad_partition(i)
            if grad is None:
                tensors = zero.averaged_gradients[i]
                if tensors is None:
                    raise RuntimeError(
                        "No reduced gradient after the pass: the closures must compute the loss through "
                        "the engine (engine(batch)), not the bare module."
                    )
                if dist.get_rank(group=group) == dist.get_world_size(group=group) - 1:
                    grad = zero.flatten_dense_tensors_aligned(tensors, int(zero.partition_size[i]))
                else:
                    grad = zero.flatten(tensors)
            out.append(grad.reshape(-1).to(dtype=flat.dtype, copy=owned))
        for grad, padding in zip(out, self.paddings, strict=True):
            grad.masked_fill_(padding, 0.0)
        return out

    def clear_gradients(self) -> None:
        """Drop the reduced gradients the way ``step()`` does when it skips an overflowed step."""
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        zero = self.zero
        zero.zero_grad(set_to_none=True)
        zero._release_preflattened_grad_buffers()
        for k in list(zero.averaged_gradients.keys()):
            zero.averaged_gradients[k] = None
        for k in list(zero.all_grad_tensors.keys()):
            zero.all_grad_tensors[k] = None
        zero.micro_step_id = INITIAL_MICRO_STEP_ID

    @torch.no_grad()
    def push_params(self) -> None:
        """fp32 partitions -> low-precision partitions -> all-gathered model parameters."""
        self.zero.update_lp_params()


class _Zero3:
    """Stage 3 (``DeepSpeedZeroOptimizer_Stage3``): one fp32 partition per sub-group."""

    def __init__(self, zero: Any, strategy: DeepSpeedZero) -> None:
        self.zero = zero
        order = sorted(range(len(zero.fp16_groups)), key=lambda sg: (zero.sub_group_to_group_id[sg], sg))
        self.order = order
        self.flats = [zero.fp32_partitioned_groups_flat[sg] for sg in order]
        segments: dict[int, list[ProbeSegment]] = {}
        # Per sub-group, per parameter: how many leading elements of its gradient partition are real.
        self.real_lengths: dict[int, list[int]] = {}
        groups = set()
        for sg in order:
            flat = zero.fp32_partitioned_groups_flat[sg]
            group = zero._get_sub_group_process_group(sg)
            groups.add(id(group))
            rank = dist.get_rank(group=group)
            segs, local, lengths = [], 0, []
            for p in zero.fp16_groups[sg]:
                chunk, numel = p.partition_numel(), p.ds_numel
                length = max(0, min(chunk, numel - rank * chunk))
                lengths.append(length)
                if length:
                    segs.append(ProbeSegment(local, length, strategy.ordinal(p), rank * chunk))
                local += chunk
            if local != flat.numel():
                raise RuntimeError(
                    f"Unexpected ZeRO-3 sub-group partition of {flat.numel()} elements (expected {local})."
                )
            segments[id(flat)] = segs
            self.real_lengths[sg] = lengths
        if len(groups) != 1:
            raise NotImplementedError(
                "Sub-groups on different partition groups (MiCS, AutoEP) are not supported."
            )
        self.paddings = [_padding_mask(flat, segments[id(flat)]) for flat in self.flats]
        _zero_padding(self.flats, self.paddings)
        strategy.bind(segments, zero.dp_process_group)

    @contextmanager
    def flats_in_groups(self):
        """Stage 3 keeps ``param_groups`` empty outside ``step()``; fill them for the passes."""
        zero = self.zero
        groups = zero.optimizer.param_groups
        saved = [g["params"] for g in groups]
        for g in groups:
            g["params"] = []
        for sg in self.order:
            groups[zero.sub_group_to_group_id[sg]]["params"].append(zero.fp32_partitioned_groups_flat[sg])
        try:
            yield
        finally:
            for g, params in zip(groups, saved, strict=True):
                g["params"] = params

    @torch.no_grad()
    def gradients(self, owned: bool = True) -> list[torch.Tensor]:
        """The reduced gradient partitions, as ``_prepare_fp32_grad_for_sub_group`` forms them.

        ``owned=False`` may return views of DeepSpeed's buffers, valid until the next pass.

        A parameter's gradient partition is a reused buffer whose padding DeepSpeed never
        writes (a rank holding none of a parameter's elements leaves all of it untouched),
        so the padding is zeroed in place first: it would otherwise leak uninitialised
        memory into the norm, the Hessian estimate, and DeepSpeed's own clipping norm.
        """
        zero, out = self.zero, []
        for sg in self.order:
            tensors = zero.averaged_gradients.get(sg)
            if tensors is None:
                raise RuntimeError(
                    "No reduced gradient after the pass: the closures must compute the loss through "
                    "the engine (engine(batch)), not the bare module."
                )
            for grad, length in zip(tensors, self.real_lengths[sg], strict=True):
                if length < grad.numel():
                    grad.view(-1)[length:].zero_()
            flat = zero.fp32_partitioned_groups_flat[sg]
            # flatten copies several tensors but returns a view of a single one
            copy = owned and len(tensors) == 1
            out.append(zero.flatten(tensors).reshape(-1).to(dtype=flat.dtype, copy=copy))
        return out

    def clear_gradients(self) -> None:
        zero = self.zero
        zero.zero_grad(set_to_none=True)
        zero.averaged_gradients = {}
        for bucket in zero.ipg_buckets.values():
            bucket.clear_params()

    @torch.no_grad()
    def push_params(self) -> None:
        """fp32 partitions -> partitioned parameters (``ds_tensor``); persistent ones re-gathered."""
        zero = self.zero
        zero._partition_all_parameters()
        for sg in self.order:
            zero._reassign_or_swap_out_partitioned_parameters(sg)
        if zero.persistent_parameters:
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
        zero.invalidate_secondary_tensor()


# ------------------------------------------------------------------------------------ driver


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
        closures = _as_closures(closure)
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
        """rho = 0 in every group: finite differences at theta on Hessian steps, then the one pass.

        The pass at theta comes last, so its reduced gradient stays in DeepSpeed's buffers for
        ``engine.step()``, as the perturbed pass does on other steps.
        """
        opt = self.optimizer
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


# ------------------------------------------------------------------------------------ entry points


def initialize(
    model: torch.nn.Module,
    config: dict[str, Any] | str | os.PathLike,
    *,
    model_parameters: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
    lr_scheduler: Any = None,
    **sassha_kwargs: Any,
) -> tuple[Any, SasshaDeepSpeed]:
    """``deepspeed.initialize`` with a :class:`ZeroSassha` optimizer; returns ``(engine, SasshaDeepSpeed)``.

    ``config`` is checked by :func:`check_config`. ``sassha_kwargs`` go to
    :class:`ZeroSassha` (``lr``, ``rho``, ``lazy_hessian``, ...). The process
    group must exist (``deepspeed.init_distributed(dist_backend=...)``).
    """
    import deepspeed

    config = check_config(config)
    params = model.parameters() if model_parameters is None else model_parameters
    optimizer = ZeroSassha(params, **sassha_kwargs)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, lr_scheduler=lr_scheduler
    )
    return engine, SasshaDeepSpeed(engine)


def to_universal(*_: Any, **__: Any) -> None:
    """DeepSpeed's universal checkpoint format only has slots for Adam's state."""
    raise NotImplementedError(
        "DeepSpeed's universal checkpoints (ds_to_universal) only know Adam's state keys "
        "(exp_avg, exp_avg_sq), so they would drop SASSHA's m, D and counters: resume from the "
        "checkpoint saved by engine.save_checkpoint with the same world size."
    )
