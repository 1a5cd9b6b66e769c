"""SASSHA under FSDP1 (use_orig_params=True) on real gloo ranks, against the reference.

Same model, batches, reference and tolerance as the FSDP2 tests (see
tests/test_fsdp2.py for the justification of ``rtol=1e-9``): the flat-shard
views must give the same global-probe trajectory as any other sharding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from sassha_dist import Sassha, state_keys
from sassha_dist.distributed import FlatShard
from tests.distributed import run_ranks
from tests.sharded import KW, STEPS, assert_matches_reference, batches, model


def _fsdp1_run(rank: int, world: int, fd_scheme: str) -> dict:
    wrapped = FullyShardedDataParallel(model(), device_id=torch.device("cpu"), use_orig_params=True)
    optimizer = Sassha(wrapped.parameters(), fd_scheme=fd_scheme, strategy=FlatShard(wrapped), **KW)
    x, y = batches(world)[rank]
    losses = [optimizer.step(lambda: nn.functional.mse_loss(wrapped(x), y)).item() for _ in range(STEPS)]
    sizes = [(p.numel(), optimizer.state[p][state_keys.MOMENTUM].numel()) for p in wrapped.parameters()]
    with FullyShardedDataParallel.summon_full_params(wrapped):
        params = [p.detach().clone() for p in wrapped.parameters()]
    return {"params": params, "losses": losses, "sizes": sizes}


@pytest.mark.parametrize(("world", "fd_scheme"), [(2, "central"), (3, "central")])
def test_fsdp1_matches_reference(world, fd_scheme):
    results = run_ranks(_fsdp1_run, world, fd_scheme, timeout=180)
    assert_matches_reference(results, world, fd_scheme, rtol=1e-9)
    # Local state is exactly the local flat-shard view: the ranks' parts add up to one copy.
    total_params = sum(p.numel() for p in model().parameters())
    assert sum(m for r in results for _, m in r["sizes"]) == total_params
    assert all(p == m for r in results for p, m in r["sizes"])


def test_fsdp1_needs_the_module():
    results = run_ranks(_auto_detect, 2, timeout=60)
    assert all("FlatShard" in message for message in results)


def _auto_detect(rank: int, world: int) -> str:
    wrapped = FullyShardedDataParallel(model(), device_id=torch.device("cpu"), use_orig_params=True)
    try:
        Sassha(wrapped.parameters())
    except ValueError as error:
        return str(error)
    return "no error"
