"""SASSHA under DDP on 2 real gloo ranks, against the single-process reference.

Tolerance: float64 throughout, and the only difference from the reference is
the order of floating-point additions in the all-reduce (DDP pre-divides by W
and sums bucket-wise; the reference sums then divides). That perturbs values
at ~1e-16 relative per step; over 20 steps the observed gap is ~1e-15, so
``rtol=1e-10`` leaves five orders of magnitude of margin and still catches
any real error (a wrong probe, a missing all-reduce, a local norm), which
shows up at 1e-3 or more.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sassha_dist import Sassha
from sassha_dist.distributed import Replicated
from sassha_dist.reference import ReferenceConfig, ReferenceSassha
from tests.distributed import run_ranks
from tests.sharded import batches

WORLD = 2
STEPS = 20
KW = {"lr": 0.05, "rho": 0.05, "lazy_hessian": 3, "n_samples": 2, "weight_decay": 0.01}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return batches(world, rows=16, features=4)


def _functional_loss(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]

    def loss_fn(params, batch):
        x, y = batch
        out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))
        return nn.functional.mse_loss(out, y)

    return loss_fn


def _ddp_run(rank: int, world: int, method: str, probe_mode: str, count: bool, local: bool = False) -> dict:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    calls = {"reducer": 0, "python": 0}
    original = dist.all_reduce
    if count:

        def hook(state, bucket):
            calls["reducer"] += 1
            tensor = bucket.buffer().div_(world)
            return original(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, hook)

        def counting_all_reduce(*args, **kwargs):
            calls["python"] += 1
            return original(*args, **kwargs)

        dist.all_reduce = counting_all_reduce
    optimizer = Sassha(
        ddp.parameters(), hessian_method=method, probe_mode=probe_mode, local_perturbation=local, **KW
    )
    assert isinstance(optimizer.strategy, Replicated)
    x, y = _batches(world)[rank]
    losses, per_step = [], []
    for _ in range(STEPS):
        before = dict(calls)
        loss = optimizer.step(lambda: nn.functional.mse_loss(ddp(x), y))
        losses.append(loss.item())
        per_step.append(
            (
                optimizer.last_report.hessian_refreshed,
                calls["reducer"] - before["reducer"],
                calls["python"] - before["python"],
            )
        )
    if count:
        dist.all_reduce = original
    return {"params": [p.detach().clone() for p in model.parameters()], "losses": losses, "calls": per_step}


def _reference(method: str, probe_mode: str, local: bool) -> tuple[list[torch.Tensor], list[float]]:
    model = _model()
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    config = ReferenceConfig(hessian_method=method, probe_mode=probe_mode, local_perturbation=local, **KW)
    ref = ReferenceSassha(params, config)
    loss_fn = _functional_loss(copy.deepcopy(model))
    batches = _batches(WORLD)
    losses = [ref.step(loss_fn, batches) for _ in range(STEPS)]
    return params, losses


@pytest.mark.parametrize(
    ("method", "probe_mode", "local"),
    [
        ("exact", "per_rank", False),
        ("exact", "global", False),
        ("finite_difference", "global", False),
        ("exact", "per_rank", True),
    ],
)
def test_ddp_matches_reference(method, probe_mode, local):
    results = run_ranks(_ddp_run, WORLD, method, probe_mode, False, local)
    ref_params, ref_losses = _reference(method, probe_mode, local)
    for result in results:
        for actual, expected in zip(result["params"], ref_params, strict=True):
            torch.testing.assert_close(actual, expected.detach(), rtol=1e-10, atol=1e-12)
    # Each rank reports its own batch's loss; the reference reports their mean.
    mean_losses = [sum(r["losses"][t] for r in results) / WORLD for t in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)


def test_ddp_collective_budget():
    """Per step: DDP reduces the gradient at theta and (ordinary steps) the perturbed gradient;
    exact-Hessian steps replace the latter by two explicit all-reduces (perturbed gradient and
    Hessian estimate, one per dtype each); one scalar all-reduce agrees on skipping."""
    results = run_ranks(_ddp_run, WORLD, "exact", "per_rank", True)
    for result in results:
        for refreshed, reducer, python in result["calls"]:
            if refreshed:
                assert (reducer, python) == (1, 3)
            else:
                assert (reducer, python) == (2, 1)


def test_ddp_local_perturbation_skips_the_first_reduction():
    """The authors' local perturbation: the gradient at theta is never reduced."""
    results = run_ranks(_ddp_run, WORLD, "exact", "per_rank", True, True)
    for result in results:
        for refreshed, reducer, python in result["calls"]:
            assert (reducer, python) == ((0, 3) if refreshed else (1, 1))


def _exact_tensors(rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s copies: two tensors above the bucket cap (all-reduced in place), small ones
    (bucketed), a second dtype (its own buckets) and a large non-contiguous view (bucketed)."""
    gen = torch.Generator().manual_seed(rank)
    shapes = [(300, 300), (7,), (40_000,), (5, 3), (2, 2)]
    tensors = [torch.randn(s, generator=gen) for s in shapes]
    tensors.append(torch.randn(50_000, generator=gen, dtype=torch.float64))
    tensors.append(torch.randn(300, 400, generator=gen).t())
    return tensors


def _reduce_exact_run(rank: int, world: int) -> list[torch.Tensor]:
    tensors = _exact_tensors(rank)
    reduced = Replicated().reduce_exact([], tensors)
    assert all(r is t for r, t in zip(reduced, tensors, strict=True))  # in place
    return tensors


def test_reduce_exact_averages_in_bounded_buckets():
    """Exact-Hessian tensors are averaged in place, large ones without a flat copy. With 2 ranks the
    sum of two values is exact-rounded and commutative, so the result equals (t0 + t1) / 2 bit for bit."""
    results = run_ranks(_reduce_exact_run, WORLD)
    expected = [(a + b) / 2 for a, b in zip(_exact_tensors(0), _exact_tensors(1), strict=True)]
    for result in results:
        for got, want in zip(result, expected, strict=True):
            assert torch.equal(got, want)


def _bucket_view_run(rank: int, world: int, bucket_view: bool) -> list[torch.Tensor]:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    kw = {**KW, "hessian_method": "finite_difference", "probe_mode": "global", "lazy_hessian": 1}
    opt = Sassha(ddp.parameters(), **kw)
    x, y = _batches(world)[rank]
    for _ in range(3):
        opt.step(lambda: nn.functional.mse_loss(ddp(x), y))
    return [p.detach().clone() for p in model.parameters()]


def test_finite_differences_with_gradients_as_bucket_views():
    """With ``gradient_as_bucket_view=True`` every backward pass writes the same DDP buckets: the
    perturbed gradient set aside and each finite difference must be the step's own copies. The two
    settings reduce the same values in the same buckets, so they agree to float64 rounding (the
    corrupted version was off by 0.2)."""
    views = run_ranks(_bucket_view_run, WORLD, True)
    plain = run_ranks(_bucket_view_run, WORLD, False)
    for a, b in zip(views[0], plain[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
