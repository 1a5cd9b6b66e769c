"""The interface between SASSHA's passes and a training engine.

The optimizer's math never branches on the engine. Everything engine-specific
(how a backward pass reduces gradients, whether double backward is allowed,
where a local shard sits in its full parameter, how scalars are summed over
ranks) goes through one :class:`Strategy`, chosen once by
:func:`resolve_strategy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["SingleProcess", "Strategy", "resolve_strategy"]


class Strategy(ABC):
    """What SASSHA needs from an engine, and nothing more."""

    #: Whether exact Hessian-vector products (double backward) work under this engine.
    supports_exact_hessian: bool = True
    #: This process's data-parallel rank; mixed into the probe key in per-rank mode.
    rank: int = 0

    @abstractmethod
    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """Accumulate ``d loss / d params`` into ``p.grad`` through the engine's own reduction."""

    @abstractmethod
    def gradients_with_graph(
        self, loss: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """Local gradients with ``create_graph=True`` (no reduction yet), ``None`` where unused."""

    @abstractmethod
    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average ``tensors`` over data-parallel ranks, in place."""

    @abstractmethod
    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a 0-dim tensor of per-rank partial sums over the ranks that shard the parameters."""

    def all_true(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise AND of boolean ``flags`` over all ranks, so every rank skips the same steps."""
        return flags

    def element_offset(self, param: torch.Tensor) -> int:
        """Index of this rank's first local element in the full, flattened parameter."""
        return 0

    def full_numel(self, param: torch.Tensor) -> int:
        """Number of elements of the full (unsharded) parameter."""
        return param.numel()


class SingleProcess(Strategy):
    """One process holds every parameter; no communication."""

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        torch.autograd.backward(loss, inputs=list(params))

    def gradients_with_graph(
        self, loss: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        return None

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        return value


def _unsupported_engine(params: Sequence[torch.Tensor]) -> str | None:
    for p in params:
        if type(p).__name__ == "DTensor" or hasattr(p, "device_mesh"):
            return "FSDP2 (fully_shard) / DTensor parameters"
        if (
            type(p).__name__ == "FlatParameter"
            or getattr(p, "_is_flat_param", False)
            or hasattr(p, "_fsdp_flattened")
        ):
            return "FSDP1 flat parameters"
        if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
            return "DeepSpeed ZeRO-3 partitioned parameters"
    return None


def resolve_strategy(params: Sequence[torch.Tensor]) -> Strategy:
    """Pick the strategy for ``params``: the one place where engines are told apart.

    Several processes in an initialised process group with whole (replicated)
    parameters mean data parallelism (DDP); one process means a single device.
    Sharded parameters are recognised and refused until their strategies land.
    """
    unsupported = _unsupported_engine(params)
    if unsupported is not None:
        raise NotImplementedError(
            f"Sassha does not support {unsupported} yet. Train with DDP or a single device, "
            "or pass strategy=... with a Strategy for this engine."
        )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from sassha_dist.distributed.data_parallel import DataParallel

        return DataParallel()
    return SingleProcess()
