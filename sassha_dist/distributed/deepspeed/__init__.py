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
* :class:`SasshaDeepSpeed` drives one training step through the engine: ``Sassha.run_passes``
  with :class:`ZeroPasses` as the pass runner (``passes.py``), then ``engine.step()``:

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

import os
from collections.abc import Iterable
from typing import Any

import torch

from sassha_dist.distributed.deepspeed.config import check_config
from sassha_dist.distributed.deepspeed.driver import SasshaDeepSpeed
from sassha_dist.distributed.deepspeed.optimizer import ZeroSassha
from sassha_dist.distributed.deepspeed.passes import ZeroPasses
from sassha_dist.distributed.deepspeed.strategy import DeepSpeedZero

__all__ = [
    "DeepSpeedZero",
    "SasshaDeepSpeed",
    "ZeroPasses",
    "ZeroSassha",
    "check_config",
    "initialize",
    "to_universal",
]


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
