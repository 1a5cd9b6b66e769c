"""DDP: every rank holds the full parameters and its own batch.

* Gradient at theta, and the perturbed gradient on ordinary steps: the
  engine's own backward, so DDP's reducer averages it (overlapped with the
  backward pass). The global norm needs no communication: every rank holds
  the same averaged gradient.
* ``local_perturbation=True`` (the authors' DDP code): the gradient at theta
  comes from ``torch.autograd.grad``, which DDP does not reduce, so each rank
  perturbs with its own gradient and norm; that pass then needs no all-reduce.
* Exact-Hessian steps: the perturbed pass uses ``torch.autograd.grad`` with
  ``create_graph=True``, for which DDP's hooks do not fire. Each rank then
  holds its local perturbed gradient and its local ``z_r * (H_r z_r)``; bucketed
  all-reduces average each (large tensors in place, small ones through flat
  buckets of bounded size). With per-rank probes this is a W-probe Hutchinson
  estimate of the global Hessian diagonal for free.

Per step: two gradient all-reductions, plus one on Hessian steps, plus one
scalar all-reduce that makes every rank take the same skip decision.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist

from sassha_dist.distributed.strategy import Strategy

__all__ = ["Replicated"]

# Bounds of one flat all-reduce bucket of exact-Hessian tensors (torch DDP's default cap is 25 MiB).
_MAX_BUCKET_BYTES = 25 * 2**20
_MIN_BUCKET_BYTES = 2**16


class Replicated(Strategy):
    """Replicated parameters in a data-parallel process group (``DistributedDataParallel``).

    Named for what it holds, not ``DataParallel``: that is ``torch.nn.DataParallel``, which
    SASSHA does not support (one process per GPU instead).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("Replicated needs an initialised torch.distributed process group.")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        # All of DDP's parameters must see the backward for its reducer to finish.
        loss.backward()

    @staticmethod
    def _accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def local_backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        # DDP's hooks do not fire for autograd.grad: the gradient stays this rank's own.
        self._accumulate(params, torch.autograd.grad(loss, params, allow_unused=True))

    def gradients_with_graph(
        self, loss: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))

    @torch.no_grad()
    def reduce_exact(
        self, params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Average ``tensors`` over ranks, in place.

        A tensor of at least a bucket's size is all-reduced in place; smaller ones go through flat
        buckets. A bucket holds at most a quarter of the tensors' bytes (and at most DDP's default
        25 MiB), so the copy it needs stays small next to the model.
        """
        total = sum(t.numel() * t.element_size() for t in tensors)
        cap = max(_MIN_BUCKET_BYTES, min(_MAX_BUCKET_BYTES, total // 4))
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        filled: dict[tuple[torch.device, torch.dtype], int] = defaultdict(int)
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if nbytes >= cap and t.is_contiguous():
                self._average_(t)
                continue
            kind = (t.device, t.dtype)
            if filled[kind] + nbytes > cap:
                self._average_bucket(buckets.pop(kind))
                filled[kind] = 0
            buckets[kind].append(t)
            filled[kind] += nbytes
        for bucket in buckets.values():
            self._average_bucket(bucket)
        return list(tensors)

    def _average_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.group)
        tensor.div_(self.world_size)

    def _average_bucket(self, bucket: list[torch.Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        self._average_(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def owned_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """A copy when ``grad`` is a view of a DDP bucket (``gradient_as_bucket_view=True``): DDP
        points the next backward pass's gradients at the same bucket and overwrites it."""
        return grad.clone() if grad._base is not None else grad

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        # Parameters are replicated, not sharded: a local sum is already global.
        return value
