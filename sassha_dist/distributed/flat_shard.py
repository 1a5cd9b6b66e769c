"""FSDP1 with ``use_orig_params=True``: each parameter is a 1-D view of its part of a flat shard.

Between forward passes every original parameter on a rank is a flat, possibly
empty, view of the elements of that parameter that fall into the rank's shard
of its module's ``FlatParameter``; its gradient (after FSDP's reduce-scatter)
is a view of the same shape. So SASSHA's math runs unchanged on these views:
the perturbation and the exact restore write into the shard, the norm is a sum
of local squares with one all-reduce over the shard group, and global probes
are generated from each view's offset in its full parameter. As under FSDP2,
double backward is not available and the Hessian comes from finite differences.

The offsets live in FSDP's per-``FlatParameter`` shard metadata, which a
parameter does not point back to, so this strategy is built from the wrapped
module: ``Sassha(model.parameters(), strategy=FlatShard(model))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from sassha_dist.distributed.strategy import ProbeSegment, Strategy, all_reduce_sum

__all__ = ["FlatShard"]


class FlatShard(Strategy):
    """Parameters of an FSDP1 (``FullyShardedDataParallel``) module built with ``use_orig_params=True``."""

    supports_exact_hessian = False
    prefers_exact_hessian = False
    supports_local_gradients = False

    def __init__(self, module: nn.Module) -> None:
        wrappers = FullyShardedDataParallel.fsdp_modules(module)
        if not wrappers:
            raise ValueError("FlatShard needs the FullyShardedDataParallel-wrapped module.")
        self.offsets: dict[int, int] = {}
        groups = set()
        for wrapper in wrappers:
            handle = wrapper._handle
            if handle is None:
                continue
            if not handle._use_orig_params:
                raise ValueError(
                    "Sassha needs FSDP1 with use_orig_params=True (parameters must stay separate tensors)."
                )
            flat = handle.flat_param
            for param, info in zip(flat._params, flat._shard_param_infos, strict=True):
                self.offsets[id(param)] = info.intra_param_start_idx if info.in_shard else 0
            groups.add(wrapper.process_group)
        if len(groups) != 1:
            raise NotImplementedError("All FSDP1 units must share one process group.")
        self.shard_group = groups.pop()
        self.rank = dist.get_rank()

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        loss.backward()

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(value, self.shard_group)

    def has_gradient(self, param: torch.Tensor) -> bool:
        # A parameter with no elements in this rank's shard gets no gradient here, but takes
        # part in the step (with an empty view) like on the ranks that hold its elements.
        return param.grad is not None or param.numel() == 0

    def probe_segments(self, param: torch.Tensor, param_index: int) -> list[ProbeSegment]:
        try:
            offset = self.offsets[id(param)]
        except KeyError:
            raise ValueError("A parameter is not managed by the FSDP1 module given to FlatShard.") from None
        return [ProbeSegment(0, param.numel(), param_index, offset)]
