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
* Double backward through sharded parameters is not available (SPEC §4),
  so by default the Hessian comes from finite differences with global probes:
  each rank generates its shard's part of one model-wide probe from the
  element indices it owns, with no communication beyond FSDP2's own
  all-gather and reduce-scatter.
* Optionally (``FullyShard(params, module=model)`` and
  ``hessian_method="exact"``), exact per-rank probes as under DDP: for the
  exact pass every FSDP unit keeps its parameters unsharded after forward and
  backward, each rank double-backwards through FSDP2's unsharded parameters
  with its own whole-model probe, every unit is resharded (no stale unsharded
  copy survives the pass), and the perturbed gradient and ``z_r * (H_r z_r)``
  are reduce-scattered (averaged) into the parameters' placements. The price
  is memory: about 4x the full fp32 model per rank during that pass
  (unsharded parameters, the gradient with its graph, ``Hz``, the estimate),
  so it is for models whose unsharded copy fits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from sassha_dist.distributed.strategy import ProbeSegment, Strategy, all_reduce_sum

__all__ = ["FullyShard"]


class FullyShard(Strategy):
    """Parameters sharded as DTensors with placements ``(Replicate()*, Shard(0))``.

    ``module`` (the ``fully_shard``-ed root) is needed only for exact Hessians.
    """

    supports_exact_hessian = False  # True on an instance built with its module
    prefers_exact_hessian = False
    supports_local_gradients = False

    def __init__(self, params: Sequence[torch.Tensor], module: nn.Module | None = None) -> None:
        params = list(params)
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
        self.units = [] if module is None else [m for m in module.modules() if isinstance(m, FSDPModule)]
        if module is not None and not self.units:
            raise ValueError("FullyShard(module=...) needs the fully_shard-ed module.")
        self.supports_exact_hessian = bool(self.units)

    def _param_groups(self) -> list[Any]:
        groups = [unit._get_fsdp_state()._fsdp_param_group for unit in self.units]
        return [g for g in groups if g is not None]

    @contextlib.contextmanager
    def exact_hessian_context(self) -> Iterator[None]:
        """Keep every unit unsharded through forward and double backward, then reshard all."""
        groups = self._param_groups()
        saved = [(g.post_forward_mesh_info, g.reshard_after_backward) for g in groups]
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            for unit in self.units:
                unit.reshard()
            for group, (mesh_info, after_backward) in zip(groups, saved, strict=True):
                group.post_forward_mesh_info, group.reshard_after_backward = mesh_info, after_backward

    def differentiable_params(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        unsharded = {
            id(fp.sharded_param): fp.unsharded_param for g in self._param_groups() for fp in g.fsdp_params
        }
        return [unsharded[id(p)] for p in params]

    def gradients_with_graph(
        self, loss: torch.Tensor, inputs: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True))

    @torch.no_grad()
    def reduce_exact(
        self, params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Reduce-scatter (average) each rank's full tensor into its parameter's placements."""
        return [
            DTensor.from_local(
                t, p.device_mesh, [Partial("avg")] * p.device_mesh.ndim, run_check=False
            ).redistribute(p.device_mesh, p.placements)
            for p, t in zip(params, tensors, strict=True)
        ]

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        loss.backward()

    def sum_scalar(self, value: torch.Tensor) -> torch.Tensor:
        if self.shard_group is None:
            return value
        return all_reduce_sum(value, self.shard_group)

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
