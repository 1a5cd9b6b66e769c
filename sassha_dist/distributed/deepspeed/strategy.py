"""DeepSpeedZero: ZeRO's flat fp32 partitions as SASSHA's local tensors (the Strategy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from sassha_dist.distributed.devices import communication_device
from sassha_dist.distributed.strategy import ProbeSegment, Strategy, all_reduce_sum
from sassha_dist.functional import sq_norm


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

    def bind(
        self,
        segments: dict[int, list[ProbeSegment]],
        group: dist.ProcessGroup | None,
        partitions: Sequence[torch.Tensor],
    ) -> None:
        """Fix the partitions' probe segments and the data-parallel group; count the model's elements.

        The count is one all-reduce (once, at bind time), on the partitions' device: NCCL refuses
        the CPU tensor gloo accepts.
        """
        self.segments = segments
        self.group = group
        self.rank = dist.get_rank()
        count = torch.full(
            (),
            sum(s.length for segs in segments.values() for s in segs),
            dtype=torch.int64,
            device=communication_device(partitions, group),
        )
        dist.all_reduce(count, group=group)
        self.num_elements = int(count)

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

    def norm_and_count(
        self, local_params: Sequence[torch.Tensor], *, foreach: bool | None
    ) -> tuple[float, int]:
        """As the base class, with the count fixed at bind time: the partitions hold ZeRO's padding."""
        return float(self.sum_scalar(sq_norm(local_params, foreach=foreach)).sqrt()), self.num_elements
