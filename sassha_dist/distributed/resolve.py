"""Which strategy runs a set of parameters: the one place where engines are told apart."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sassha_dist.distributed.data_parallel import Replicated
from sassha_dist.distributed.fully_shard import FullyShard
from sassha_dist.distributed.strategy import SingleProcess, Strategy

__all__ = ["resolve_strategy"]


def _unsupported_engine(params: Sequence[torch.Tensor]) -> str | None:
    for p in params:
        if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
            return "DeepSpeed ZeRO-3 partitioned parameters"
    return None


def resolve_strategy(params: Sequence[torch.Tensor]) -> Strategy:
    """Pick the strategy for ``params``: the one place where engines are told apart.

    DTensor parameters mean FSDP2 (``fully_shard``, HSDP included). Several
    processes in an initialised process group with whole (replicated)
    parameters mean data parallelism (DDP); one process means a single device.
    Engines without a strategy yet are recognised and refused.
    """
    if params and all(isinstance(p, DTensor) for p in params):
        return FullyShard(params)
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise ValueError(
            "These parameters belong to an FSDP1 (FullyShardedDataParallel) module: build the optimizer "
            "with strategy=sassha_dist.distributed.FlatShard(fsdp_model) (needs use_orig_params=True)."
        )
    unsupported = _unsupported_engine(params)
    if unsupported is not None:
        raise NotImplementedError(
            f"Sassha does not support {unsupported} yet. Train with DDP or a single device, "
            "or pass strategy=... with a Strategy for this engine."
        )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Replicated()
    return SingleProcess()
