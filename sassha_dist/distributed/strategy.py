"""The interface between SASSHA's passes and a training engine.

The optimizer's math never branches on the engine. Everything engine-specific
(how a backward pass reduces gradients, whether double backward is allowed,
where a local shard sits in its full parameter, how scalars are summed over
ranks) goes through one :class:`Strategy`, chosen once by
:func:`sassha_dist.distributed.resolve.resolve_strategy`. This module imports no
implementation, so the implementations import it without a cycle.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sassha_dist.distributed.devices import communication_device
from sassha_dist.functional import sq_norm
from sassha_dist.options import EngineCapabilities

__all__ = ["ProbeSegment", "SingleProcess", "Strategy", "all_reduce_sum"]


@dataclass(frozen=True)
class ProbeSegment:
    """A run of a local tensor's elements that belongs to one parameter.

    Elements ``local_start .. local_start + length - 1`` of the flattened local
    tensor are elements ``element_offset ..`` of the full, flattened parameter
    whose probe ordinal is ``param_index``.
    """

    local_start: int
    length: int
    param_index: int
    element_offset: int


class Strategy(ABC):
    """What SASSHA needs from an engine, and nothing more."""

    #: Whether exact Hessian-vector products (double backward) work under this engine.
    supports_exact_hessian: bool = True
    #: Whether ``hessian_method="auto"`` picks them (false where they cost unsharded memory).
    prefers_exact_hessian: bool = True
    #: Whether each rank can take an unreduced gradient of its own loss (whole parameters).
    supports_local_gradients: bool = True
    #: Whether only model-wide probes work (the Hessian comes from engine-reduced gradients).
    global_probes_only: bool = False
    #: This process's data-parallel rank; mixed into the probe key in per-rank mode.
    rank: int = 0

    @property
    def capabilities(self) -> EngineCapabilities:
        """What this engine allows, for :func:`sassha_dist.options.resolve_options`."""
        return _capabilities(type(self).__name__, self)

    @classmethod
    def default_capabilities(cls) -> EngineCapabilities:
        """What the engine allows before an instance is built (a start-up check, as the Trainer's).

        An instance may allow more: ``FullyShard`` with its module allows exact Hessians.
        """
        return _capabilities(cls.__name__, cls)

    @abstractmethod
    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """Accumulate ``d loss / d params`` into ``p.grad`` through the engine's own reduction."""

    @abstractmethod
    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        """Sum per-rank partial sums (0-dim or short 1-D) over the ranks that shard the parameters."""

    def local_backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """Accumulate this rank's ``d loss / d params`` into ``p.grad`` without any cross-rank reduction."""
        raise NotImplementedError(f"{type(self).__name__} does not support unreduced local gradients.")

    def exact_hessian_context(self) -> contextlib.AbstractContextManager[None]:
        """Entered around the exact-Hessian pass (FSDP2 keeps parameters unsharded inside it)."""
        return contextlib.nullcontext()

    def differentiable_params(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The full tensors to differentiate for ``params`` after a forward pass (exact Hessian)."""
        return list(params)

    def gradients_with_graph(
        self, loss: torch.Tensor, inputs: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """Local gradients with ``create_graph=True`` (no reduction yet), ``None`` where unused."""
        raise NotImplementedError(f"{type(self).__name__} does not support exact Hessian-vector products.")

    def reduce_exact(
        self, params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Average per-rank full ``tensors`` over ranks, laid out like ``params`` (sharded where they are)."""
        raise NotImplementedError(f"{type(self).__name__} does not support exact Hessian-vector products.")

    def all_true(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise AND of boolean ``flags`` over all ranks, so every rank skips the same steps."""
        flags = flags.to(device=communication_device([flags]), dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return flags.bool()

    def has_gradient(self, param: torch.Tensor) -> bool:
        """Whether ``param`` takes part in this step (after the gradient pass)."""
        return param.grad is not None

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` (a parameter, its gradient or its state) this rank owns, as a view."""
        return tensor

    def owned_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """A local gradient taken off its parameter, safe to keep across the next backward pass."""
        return grad

    def probe_segments(self, param: torch.Tensor, param_index: int) -> list[ProbeSegment]:
        """Where this rank's local elements of ``param`` sit in the full parameters they belong to."""
        return [ProbeSegment(0, self.local(param).numel(), param_index, 0)]

    def norm_and_count(
        self, local_params: Sequence[torch.Tensor], *, foreach: bool | None
    ) -> tuple[float, int]:
        """The 2-norm of the whole model's parameters and their number of elements, over all ranks.

        The inputs of the finite-difference step ``h``; both summed over shards in one collective.
        """
        local_sq_norm = sq_norm(local_params, foreach=foreach)
        local_count = local_sq_norm.new_full((), float(sum(p.numel() for p in local_params)))  # no H2D copy
        totals = self.sum_scalar(torch.stack([local_sq_norm, local_count]))
        point_sq_norm, num_elements = totals.tolist()
        return math.sqrt(point_sq_norm), round(num_elements)


class SingleProcess(Strategy):
    """One process holds every parameter; no communication."""

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        torch.autograd.backward(loss, inputs=list(params))

    local_backward = backward

    def gradients_with_graph(
        self, loss: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))

    def reduce_exact(
        self, params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        return list(tensors)

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_true(self, flags: torch.Tensor) -> torch.Tensor:
        return flags


def _capabilities(name: str, source: Strategy | type[Strategy]) -> EngineCapabilities:
    return EngineCapabilities(
        name=name,
        exact_hessian=source.supports_exact_hessian,
        prefers_exact_hessian=source.prefers_exact_hessian,
        local_gradients=source.supports_local_gradients,
        global_probes_only=source.global_probes_only,
    )


def all_reduce_sum(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """A summed copy of ``value`` over ``group`` (the ranks that shard the parameters)."""
    value = value.detach().to(communication_device([value], group), copy=True)
    dist.all_reduce(value, group=group)
    return value
