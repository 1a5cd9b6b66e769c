"""SASSHA under FSDP2 (fully_shard) on real gloo ranks, against the single-process reference.

Global-probe mode with finite-difference Hessians, so the trajectory must not
depend on W or on how parameters are sharded: each FSDP2 run at W ranks is
compared with the reference fed the same W per-rank batches (its gradient is
their mean, as FSDP2's reduce-scatter averages).

Tolerance: float64; FSDP2's reduce-scatter sums in a different order from the
reference's mean (~1e-16 relative), and the finite difference divides gradient
differences by 2h with h ~ 1e-3 * rms(w), amplifying that to ~1e-13 in the
Hessian estimate, which enters the update through sqrt(D). Observed gaps are
below 1e-12 after 20 steps; ``rtol=1e-9`` keeps three orders of margin while a
wrong probe offset, a missing norm all-reduce or a stale shard shows up at 1e-3.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sassha_dist import Sassha, state_keys
from sassha_dist.distributed import FullyShard
from tests.distributed import run_ranks
from tests.sharded import KW, STEPS, assert_matches_reference, batches, model, reference


def _fsdp2_run(rank: int, world: int, fd_scheme: str, mesh_shape: tuple[int, ...] | None = None) -> dict:
    """Train under fully_shard (an HSDP mesh when ``mesh_shape`` is 2-D), counting collectives per step."""
    model_ = model()
    if mesh_shape is None:
        mesh = init_device_mesh("cpu", (world,))
    else:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    for layer in model_:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model_, mesh=mesh)
    optimizer = Sassha(model_.parameters(), fd_scheme=fd_scheme, **KW)
    assert isinstance(optimizer.strategy, FullyShard)
    counts = {"all_reduce": 0, "reduce_scatter_single": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in counts:
        setattr(dist, name, counting(name))
    x, y = batches(world)[rank]
    losses, per_step = [], []
    try:
        for _ in range(STEPS):
            before = dict(counts)
            losses.append(optimizer.step(lambda: nn.functional.mse_loss(model_(x), y)).item())
            per_step.append(
                (optimizer.last_report.hessian_refreshed, *(counts[n] - before[n] for n in counts))
            )
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    sizes = []
    for p in model_.parameters():
        state = optimizer.state[p]
        local_m = state[state_keys.MOMENTUM].to_local()
        local_d = state[state_keys.HESSIAN_DIAG].to_local()
        assert state[state_keys.MOMENTUM].placements == p.placements
        sizes.append((p.to_local().numel(), local_m.numel(), local_d.numel(), p.numel()))
    return {
        "params": [p.full_tensor().detach().clone() for p in model_.parameters()],
        "losses": losses,
        "sizes": sizes,
        "collectives": per_step,
    }


@pytest.mark.parametrize(("world", "fd_scheme"), [(2, "central"), (3, "central"), (2, "forward")])
def test_fsdp2_matches_reference(world, fd_scheme):
    results = run_ranks(_fsdp2_run, world, fd_scheme, timeout=180)
    assert_matches_reference(results, world, fd_scheme, rtol=1e-9)
    # State is sharded like the parameters: each rank holds exactly its shard of m and D
    # (empty where its shard is empty), and the shards add up to the full parameter.
    for index in range(len(results[0]["sizes"])):
        local = [r["sizes"][index] for r in results]
        assert all(p == m == d for p, m, d, _ in local)
        assert sum(p for p, _, _, _ in local) == local[0][3]
    assert any(r["sizes"][-1][0] == 0 for r in results), "expected an empty shard"


def test_fsdp2_collective_budget():
    """Our own collectives per step: one all-reduce for the global norm and one for the skip
    decision, plus one on Hessian steps for the finite-difference step size. Gradients move
    only through FSDP2's reduce-scatter, once per FSDP unit (3 Linear layers) per pass: 2 passes,
    plus 2 per probe (central differences, n_samples=2) on Hessian steps."""
    units = 3
    for result in run_ranks(_fsdp2_run, 2, "central", timeout=180):
        for refreshed, all_reduces, reduce_scatters in result["collectives"]:
            passes = 2 + (2 * KW["n_samples"] if refreshed else 0)
            assert all_reduces == (3 if refreshed else 2)
            assert reduce_scatters == units * passes


def test_hsdp_matches_reference():
    """An HSDP mesh (2 replicas x 1 shard): replicas all-reduce gradients, the norm is summed over
    the shard group only; the trajectory equals the reference fed both ranks' batches."""
    results = run_ranks(_fsdp2_run, 2, "central", (2, 1), timeout=180)
    assert_matches_reference(results, 2, "central", rtol=1e-9)


def _fsdp2_exact_run(rank: int, world: int) -> dict:
    model_ = model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model_:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model_, mesh=mesh)
    strategy = FullyShard(model_.parameters(), module=model_)
    kw = {**KW, "hessian_method": "exact", "probe_mode": "per_rank"}
    optimizer = Sassha(model_.parameters(), strategy=strategy, **kw)
    x, y = batches(world)[rank]
    losses = [optimizer.step(lambda: nn.functional.mse_loss(model_(x), y)).item() for _ in range(STEPS)]
    # After a step no unit is left unsharded (nothing stale), and state is sharded like the parameters.
    for p in model_.parameters():
        assert optimizer.state[p][state_keys.HESSIAN_DIAG].placements == p.placements
    return {"params": [p.full_tensor().detach().clone() for p in model_.parameters()], "losses": losses}


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_exact_per_rank_probes_match_the_reference(world):
    """The opt-in exact mode: W per-rank probes, each rank's exact z_r * (H_r z_r) on its own
    batch, averaged, exactly as the reference's W-rank emulation (and as DDP); float64,
    same justification for rtol=1e-9 as above (no finite difference here: observed ~1e-15)."""
    results = run_ranks(_fsdp2_exact_run, world, timeout=180)
    ref_params, ref_losses = reference(world, "central", hessian_method="exact", probe_mode="per_rank")
    for result in results:
        for actual, expected in zip(result["params"], ref_params, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
    mean_losses = [sum(r["losses"][t] for r in results) / world for t in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), rtol=1e-9, atol=0)


def test_global_probe_reference_is_the_single_process_run():
    """Global-probe mode does not depend on W: the reference fed W per-rank batches (what the
    sharded runs above are compared with) equals Sassha at W=1 on the concatenated batch.
    Float64; mean of equal-size per-rank MSEs vs one MSE over all rows differs only in
    summation order (~1e-16), amplified by the finite difference to ~1e-13: rtol=1e-9."""
    world = 3
    single = model()
    x = torch.cat([b[0] for b in batches(world)])
    y = torch.cat([b[1] for b in batches(world)])
    optimizer = Sassha(single.parameters(), fd_scheme="central", **KW)
    losses = [optimizer.step(lambda: nn.functional.mse_loss(single(x), y)).item() for _ in range(STEPS)]
    ref_params, ref_losses = reference(world, "central")
    for actual, expected in zip(single.parameters(), ref_params, strict=True):
        torch.testing.assert_close(actual.detach(), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-9, atol=0)
