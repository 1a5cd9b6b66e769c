"""ZeroSassha: SASSHA as DeepSpeed's client optimizer, updating the partitions engine.step() hands it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from sassha_dist.distributed.deepspeed.strategy import DeepSpeedZero
from sassha_dist.optimizer import Sassha
from sassha_dist.step import StepState


@dataclass
class UpdatePlan:
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
        #: The step ``engine.step()`` applies: set by ``SasshaDeepSpeed`` around that call only.
        self.plan: UpdatePlan | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("plan", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__["plan"] = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """DeepSpeed's call into the update, for the partitions now in ``param_groups``."""
        plan = self.plan
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
