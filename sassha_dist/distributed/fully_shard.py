"""FSDP2 (``fully_shard``), including HSDP meshes: parameters are DTensor shards.

* Every pass is an ordinary backward: FSDP2 all-gathers the parameters and
  reduce-scatters the averaged gradient into the same ``Shard(0)`` placement
  as the parameter. The optimizer then works on local shards only: ``m`` and
  ``D`` are DTensors of the parameter's placement (empty shards included),
  the perturbation and the exact restore are written into the local shard
  in place, so FSDP2's next all-gather sees them and no unsharded copy goes stale.
* The global norm is a sum of local squares with one all-reduce over the
  shard group (on an HSDP mesh, the shard dimension only: replicas hold
  identical shards).
* Double backward is not available (SPEC §4), so the Hessian comes from
  finite differences with global probes: each rank generates its shard's
  part of one model-wide probe from the element indices it owns, with no
  communication beyond FSDP2's own all-gather and reduce-scatter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from sassha_dist.distributed.strategy import ProbeSegment, Strategy

__all__ = ["FullyShard"]


class FullyShard(Strategy):
    """Parameters sharded as DTensors with placements ``(Replicate()*, Shard(0))``."""

    supports_exact_hessian = False
    supports_local_gradients = False

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        dtensors = [p for p in params if isinstance(p, DTensor)]
        if not dtensors or len(dtensors) != len(params):
            raise ValueError("FullyShard needs every parameter to be a DTensor (a fully_shard'ed module).")
        mesh = dtensors[0].device_mesh
        if any(p.device_mesh != mesh for p in dtensors):
            raise ValueError("All parameters must live on one device mesh; use one optimizer per mesh.")
        placements = {tuple(p.placements) for p in dtensors}
        shard_dims = set()
        for placement in placements:
            for dim, place in enumerate(placement):
                if isinstance(place, Shard) and place.dim == 0:
                    shard_dims.add(dim)
                elif not isinstance(place, Replicate):
                    raise NotImplementedError(
                        f"Unsupported placement {placement}: Sassha supports fully_shard's "
                        "(Replicate()*, Shard(0)) layouts."
                    )
        if len(shard_dims) > 1:
            raise NotImplementedError(
                f"Parameters sharded over several mesh dimensions {sorted(shard_dims)}."
            )
        self.mesh: DeviceMesh = mesh
        self.shard_group = mesh.get_group(shard_dims.pop()) if shard_dims else None
        self.rank = dist.get_rank()

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        loss.backward()

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        if self.shard_group is None:
            return value
        value = value.clone()
        dist.all_reduce(value, group=self.shard_group)
        return value

    def all_true(self, flags: torch.Tensor) -> torch.Tensor:
        flags = flags.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return flags.bool()

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def probe_segments(self, param: torch.Tensor, param_index: int) -> list[ProbeSegment]:
        local = self.local(param)
        offset = 0
        for dim, place in enumerate(param.placements):
            if isinstance(place, Shard):
                rows = param.shape[0]
                chunk = math.ceil(rows / self.mesh.size(dim))
                first_row = min(self.mesh.get_local_rank(dim) * chunk, rows)
                expected_rows = max(min(chunk, rows - first_row), 0)
                if local.shape[0] != expected_rows:
                    raise RuntimeError(
                        f"Unexpected shard of {expected_rows} rows expected, got {local.shape[0]}: "
                        "this FSDP2 version shards differently from torch.chunk."
                    )
                offset = first_row * (param.numel() // rows)
        return [ProbeSegment(0, local.numel(), param_index, offset)]
