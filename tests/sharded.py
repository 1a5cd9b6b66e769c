"""Shared pieces of the sharded-engine tests: a model with uneven and empty shards, per-rank
batches, the reference run in global-probe mode, and the comparison against it."""

from __future__ import annotations

import torch
from torch import nn

from sassha_dist.reference import ReferenceConfig, ReferenceSassha

STEPS = 20
KW = {
    "lr": 0.05,
    "rho": 0.05,
    "lazy_hessian": 3,
    "n_samples": 2,
    "weight_decay": 0.01,
    "hessian_method": "finite_difference",
    "probe_mode": "global",
}


def model() -> nn.Module:
    """Rows 7, 3 and 1 give uneven shards at W=2 and W=3, and empty ones (1 row over 2-3 ranks)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def fully_sharded(module: nn.Module, world: int) -> nn.Module:
    """``module`` under FSDP2 on a CPU mesh of ``world`` ranks: each Linear its own unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def batches(world: int, rows: int = 12, features: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One float64 regression batch per rank, the same on every call."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(rows, features, generator=g, dtype=torch.float64),
            torch.randn(rows, 1, generator=g, dtype=torch.float64),
        )
        for _ in range(world)
    ]


def reference(world: int, fd_scheme: str, **overrides) -> tuple[list[torch.Tensor], list[float]]:
    twin = model()
    names = [n for n, _ in twin.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in twin.parameters()]

    def loss_fn(ps, batch):
        x, y = batch
        out = torch.func.functional_call(twin, dict(zip(names, ps, strict=True)), (x,))
        return nn.functional.mse_loss(out, y)

    ref = ReferenceSassha(params, ReferenceConfig(fd_scheme=fd_scheme, **{**KW, **overrides}))
    per_rank = batches(world)
    losses = [ref.step(loss_fn, per_rank) for _ in range(STEPS)]
    return [p.detach() for p in params], losses


def assert_matches_reference(results: list[dict], world: int, fd_scheme: str, rtol: float) -> None:
    """Full parameters on every rank and the mean of per-rank losses against the reference."""
    ref_params, ref_losses = reference(world, fd_scheme)
    for result in results:
        for actual, expected in zip(result["params"], ref_params, strict=True):
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-12)
    mean_losses = [sum(r["losses"][t] for r in results) / world for t in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), rtol=rtol, atol=0)
