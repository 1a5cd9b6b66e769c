"""FSDP2 with MixedPrecisionPolicy(param_dtype=bfloat16): the finite-difference Hessian
against the exact one, and a bf16 training run.

The finite-difference estimate z * (g(w+hz) - g(w-hz)) / 2h is computed by the
optimizer itself under FSDP2 (fp32 sharded master weights, bf16 forward and
backward). The exact estimate z * (Hz) uses the same global probe, computed by
fp32 double backward on an unsharded copy of the model. The error is
||fd - exact|| / ||exact||, over the whole model (shards summed).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sassha_dist import Sassha
from sassha_dist.hessian import exact_hvp, probe_key, rademacher
from tests.distributed import run_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(64, 16, generator=g), torch.randn(64, 1, generator=g)


def _exact_estimate(world: int) -> list[torch.Tensor]:
    """z * (H z) of the mean loss over all ranks' batches, fp32, with probe (seed 0, refresh 0, sample 0)."""
    model = _model()
    params = list(model.parameters())
    loss = sum(nn.functional.mse_loss(model(x), y) for x, y in map(_batch, range(world))) / world
    grads = torch.autograd.grad(loss, params, create_graph=True)
    probes = [rademacher(probe_key(0, 0, i, 0), p.numel()).view_as(p) for i, p in enumerate(params)]
    return [
        z * hz for z, hz in zip(probes, exact_hvp(grads, params, probes, retain_graph=False), strict=True)
    ]


def _fd_error(rank: int, world: int, bf16: bool, fd_scheme: str, fd_step: float) -> float:
    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = Sassha(model.parameters(), rho=0.0, fd_scheme=fd_scheme, fd_step=fd_step)
    x, y = _batch(rank)

    def closure():
        return nn.functional.mse_loss(model(x).float(), y)

    optimizer.gradient_pass(closure)
    optimizer.perturb()
    optimizer.perturbed_pass(closure)
    optimizer.hessian_pass(closure)
    estimates = optimizer.current_step.estimates
    optimizer.cancel()
    exact = _exact_estimate(world)
    sq_err, sq_ref = torch.zeros(()), torch.zeros(())
    for p, est, ref in zip(model.parameters(), estimates, exact, strict=True):
        segment = optimizer.strategy.probe_segments(p, 0)[0]
        ref_local = ref.reshape(-1)[segment.element_offset : segment.element_offset + segment.length]
        sq_err += (est.reshape(-1).double() - ref_local.double()).square().sum()
        sq_ref += ref_local.double().square().sum()
    totals = torch.stack([sq_err, sq_ref])
    dist.all_reduce(totals)
    return float((totals[0] / totals[1]).sqrt())


# Bounds: the measured error times ~3-4, for headroom across BLAS builds and thread counts.
# fp32, central, h0=1e-3: measured 6.8e-5 (SPEC §4: 5.5e-5 on a tiny GPT-2).
# bf16 compute, central, h0=2.5e-2 (the step to pass under bf16 mixed precision): measured 5.4e-2
# (SPEC: 3-4% on a tiny GPT-2). The full sweep is in the README; forward differences are 2-3x worse.
@pytest.mark.parametrize(
    ("bf16", "fd_scheme", "fd_step", "bound"),
    [
        (False, "central", 1e-3, 3e-4),
        (True, "central", 2.5e-2, 0.15),
    ],
)
def test_fd_hessian_error_under_fsdp2(bf16, fd_scheme, fd_step, bound):
    errors = run_ranks(_fd_error, 2, bf16, fd_scheme, fd_step, timeout=120)
    assert errors[0] == pytest.approx(errors[1])
    print(f"FSDP2 {'bf16' if bf16 else 'fp32'} {fd_scheme} h0={fd_step}: relative error {errors[0]:.3e}")
    assert errors[0] < bound


def _bf16_training(rank: int, world: int) -> tuple[float, float]:
    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = Sassha(model.parameters(), lr=0.02, rho=0.02, lazy_hessian=2, fd_step=2.5e-2)
    x, y = _batch(rank)
    losses = [optimizer.step(lambda: nn.functional.mse_loss(model(x).float(), y)).item() for _ in range(15)]
    assert optimizer.skipped_steps == 0
    return losses[0], losses[-1]


def test_bf16_fsdp2_training_reduces_the_loss():
    for first, last in run_ranks(_bf16_training, 2, timeout=120):
        assert last < first
