"""Sharded (DCP) and consolidated checkpoints: resume at another world size or under another engine.

One FSDP2 run at W=2 (global probes, finite-difference Hessians: the trajectory
does not depend on W) trains ``BEFORE`` steps, saves a DCP checkpoint and a
consolidated export, then continues ``AFTER`` steps: that is the uninterrupted
run. Each test resumes from the checkpoint on a freshly (and differently)
initialised model and fresh optimizer, runs the same ``AFTER`` steps on the
same global batches, and compares the final parameters and the losses.

Tolerances (float64 throughout):

* same engine and W=2: ``torch.equal``. The state is restored bit for bit and
  the same collectives run on the same shards, so nothing may differ.
* other W or another engine: ``rtol=1e-9``, the tolerance of the FSDP2-vs-
  reference tests (tests/test_fsdp2.py). W changes the order in which the
  gradient of the global batch is summed (per-rank means, then the engine's
  average), ~1e-16 relative per pass; the finite difference divides gradient
  differences by 2h, h ~ 1e-3 * rms(w), which amplifies that to ~1e-13 in D.
  Observed gaps after the resumed steps are below 1e-13 (printed by
  ``pytest -s``); any real resume error (a lost refresh count shifts the probe
  stream, a wrong shard of m or D, a reset bias correction) moves parameters
  by 1e-4 or more.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sassha_dist import Sassha, checkpoint, state_keys
from sassha_dist.distributed import FullyShard, Replicated, SingleProcess
from tests.distributed import run_ranks
from tests.helpers import closure_for, make_batches, make_mlp
from tests.sharded import KW

BEFORE, AFTER = 5, 4  # lazy_hessian=3 refreshes at steps 1, 4, 7: the save is mid-cycle
ROWS = 12  # the global batch; 12 rows split evenly over W = 1, 2, 3
RTOL = 1e-9


def make_model(seed: int = 0) -> nn.Module:
    """Rows 7, 3 and 1: uneven shards at W=2 and W=3, and empty ones."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(ROWS, 5, generator=gen, dtype=torch.float64)
    return x, torch.randn(ROWS, 1, generator=gen, dtype=torch.float64)


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    return x.chunk(world)[rank], y.chunk(world)[rank]


def fsdp2(model: nn.Module, world: int) -> nn.Module:
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, optimizer, steps, rank: int, world: int) -> list[float]:
    """Steps ``steps`` (1-based global indices); returns the global (rank-averaged) loss of each."""
    losses = []
    for step in steps:
        x, y = local_batch(step, rank, world)
        loss = optimizer.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y)).detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    return losses


def full_params(model: nn.Module) -> list[torch.Tensor]:
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()
    ]


# -- the runs, each on real gloo ranks ----------------------------------------------------------------


def _original(rank: int, world: int, root: str, full: str) -> dict:
    model = fsdp2(make_model(), world)
    optimizer = Sassha(model.parameters(), **KW)
    assert isinstance(optimizer.strategy, FullyShard)
    losses = train(model, optimizer, range(1, BEFORE + 1), rank, world)
    checkpoint.save_checkpoint(root, BEFORE, model, optimizer, extra={"note": "mid-cycle"})
    checkpoint.export_full(full, model, optimizer)
    counters = dict(optimizer.counters)
    losses += train(model, optimizer, range(BEFORE + 1, BEFORE + AFTER + 1), rank, world)
    return {"params": full_params(model), "losses": losses, "counters_at_save": counters}


def _resume_fsdp2(rank: int, world: int, root: str) -> dict:
    model = fsdp2(make_model(seed=7), world)  # another init: the checkpoint must overwrite it
    optimizer = Sassha(model.parameters(), **KW)
    assert len(optimizer.state) == 0  # lazy: load creates the state in this run's placement
    extra = checkpoint.load_latest(root, model, optimizer)
    placements_ok = all(
        optimizer.state[p][state_keys.MOMENTUM].placements == p.placements
        and optimizer.state[p][state_keys.HESSIAN_DIAG].placements == p.placements
        for p in model.parameters()
    )
    counters = dict(optimizer.counters)
    losses = train(model, optimizer, range(extra["step"] + 1, extra["step"] + AFTER + 1), rank, world)
    return {
        "params": full_params(model),
        "losses": losses,
        "extra": extra,
        "counters": counters,
        "placements_ok": placements_ok,
    }


def _resume_ddp(rank: int, world: int, full: str, export: str) -> dict:
    model = make_model(seed=7)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = Sassha(ddp.parameters(), **KW)
    assert isinstance(optimizer.strategy, Replicated)
    checkpoint.import_full(full, ddp, optimizer)
    losses = train(ddp, optimizer, range(BEFORE + 1, BEFORE + 3), rank, world)
    checkpoint.export_full(export, ddp, optimizer)
    return {"losses": losses, "counters": dict(optimizer.counters)}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The uninterrupted W=2 FSDP2 run, which also leaves the checkpoints behind."""
    directory = tmp_path_factory.mktemp("checkpoints")
    root, full = directory / "run", directory / "full.pt"
    results = run_ranks(_original, 2, str(root), str(full), timeout=180)
    for result in results[1:]:
        for a, b in zip(result["params"], results[0]["params"], strict=True):
            assert torch.equal(a, b)
    return {"root": root, "full": full, "directory": directory, **results[0]}


def _assert_close_to_original(params, losses, original, exact: bool, label: str) -> None:
    gap = max(
        float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())
        for a, b in zip(params, original["params"], strict=True)
    )
    print(f"{label}: max relative parameter gap to the uninterrupted run {gap:.1e}")
    for actual, expected in zip(params, original["params"], strict=True):
        if exact:
            assert torch.equal(actual, expected), label
        else:
            torch.testing.assert_close(actual, expected, rtol=RTOL, atol=1e-12)
    expected_losses = torch.tensor(original["losses"][-len(losses) :])
    torch.testing.assert_close(torch.tensor(losses), expected_losses, rtol=0 if exact else RTOL, atol=0)


# -- tests -------------------------------------------------------------------------------------------


def test_checkpoint_layout_and_manifest(original):
    root = original["root"]
    assert checkpoint.latest_checkpoint(root) == root / "step_00000005"
    assert (root / "latest").read_text().strip() == "step_00000005"
    manifest = json.loads((root / "step_00000005" / checkpoint.MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["extra"] == {"note": "mid-cycle", "step": 5}
    assert ".metadata" in manifest["files"] and len(manifest["files"]) >= 3  # metadata + one file per rank
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert original["counters_at_save"] == {"global_step": 5, "hessian_refreshes": 2, "skipped_steps": 0}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dcp_resume_at_another_world_size_continues_the_trajectory(original, world):
    results = run_ranks(_resume_fsdp2, world, str(original["root"]), timeout=180)
    for result in results:
        assert result["extra"] == {"note": "mid-cycle", "step": BEFORE}
        assert result["counters"] == original["counters_at_save"]
        assert result["placements_ok"]
        _assert_close_to_original(
            result["params"], result["losses"], original, exact=world == 2, label=f"FSDP2 W=2 -> W={world}"
        )


def test_dcp_checkpoint_loads_on_a_single_device_without_a_process_group(original):
    """DCP gathers the FSDP2 shards into plain tensors for a model that is not sharded at all."""
    model = make_model(seed=7)
    optimizer = Sassha(model.parameters(), **KW)
    assert isinstance(optimizer.strategy, SingleProcess)
    extra = checkpoint.load_latest(original["root"], model, optimizer)
    assert extra["step"] == BEFORE and optimizer.counters == original["counters_at_save"]
    losses = train(model, optimizer, range(BEFORE + 1, BEFORE + AFTER + 1), 0, 1)
    _assert_close_to_original(full_params(model), losses, original, exact=False, label="DCP -> single")


def _resume_fsdp2_from_full(rank: int, world: int, full: str, first: int) -> dict:
    model = fsdp2(make_model(seed=7), world)
    optimizer = Sassha(model.parameters(), **KW)
    checkpoint.import_full(full, model, optimizer)  # full tensors -> this rank's shards
    placements_ok = all(
        optimizer.state[p][state_keys.MOMENTUM].placements == p.placements for p in model.parameters()
    )
    losses = train(model, optimizer, range(first, BEFORE + AFTER + 1), rank, world)
    return {"params": full_params(model), "losses": losses, "placements_ok": placements_ok}


def test_consolidated_state_moves_fsdp2_to_ddp_to_single_device_to_fsdp2(original):
    """FSDP2 (W=2) trains steps 1-5 -> consolidated export -> DDP (W=2) trains 6-7 -> export -> one device
    trains 8 -> export -> FSDP2 at W=3 trains 9: the trajectory is the uninterrupted FSDP2 run's."""
    full = torch.load(original["full"], weights_only=True)
    assert set(full) == {"model", "optimizer"}
    assert set(full["model"]) == {n for n, _ in make_model().named_parameters()}
    assert set(full["optimizer"]["state"]) == set(full["model"])  # keyed by name, full (plain) tensors
    for name, entry in full["optimizer"]["state"].items():
        assert type(entry["momentum"]) is torch.Tensor
        assert entry["momentum"].shape == full["model"][name].shape
    after_ddp = original["directory"] / "after_ddp.pt"
    ddp = run_ranks(_resume_ddp, 2, str(original["full"]), str(after_ddp), timeout=180)
    assert ddp[0]["counters"]["global_step"] == BEFORE + 2
    model = make_model(seed=7)
    optimizer = Sassha(model.parameters(), **KW)
    checkpoint.import_full(after_ddp, model, optimizer)
    single_losses = train(model, optimizer, [BEFORE + 3], 0, 1)
    after_single = checkpoint.export_full(original["directory"] / "after_single.pt", model, optimizer)
    last = run_ranks(_resume_fsdp2_from_full, 3, str(after_single), BEFORE + 4, timeout=180)
    assert all(r["placements_ok"] for r in last)
    losses = ddp[0]["losses"] + single_losses + last[0]["losses"]
    _assert_close_to_original(
        last[0]["params"], losses, original, exact=False, label="FSDP2 -> DDP -> single -> FSDP2 W=3"
    )


# -- FQN-keyed state in memory (single process) ----------------------------------------------------------


def _trained(steps: int = 3, **kw):
    model = make_model()
    optimizer = Sassha(model.parameters(), **{**KW, **kw})
    train(model, optimizer, range(1, steps + 1), 0, 1)
    return model, optimizer


def test_optimizer_state_dict_is_keyed_by_name():
    model, optimizer = _trained()
    state = checkpoint.optimizer_state_dict(model, optimizer)
    names = [n for n, _ in model.named_parameters()]
    assert list(state["state"]) == names
    assert state["param_groups"][0]["params"] == names
    assert state[state_keys.COUNTERS] == {"global_step": 3, "hessian_refreshes": 1, "skipped_steps": 0}
    for name, p in model.named_parameters():
        assert state["state"][name]["momentum"] is optimizer.state[p]["momentum"]


def test_names_are_the_same_inside_a_compile_wrapper():
    """(DDP's ``module.`` prefix: the DDP leg of the cross-engine test above loads FSDP2 names.)"""
    model = make_model()
    wrapped = type("OptimizedModule", (nn.Module,), {})()
    wrapped._orig_mod = model  # what torch.compile's wrapper looks like
    assert list(checkpoint.parameter_names(wrapped).values()) == [n for n, _ in model.named_parameters()]


def test_round_trip_in_memory_is_bit_identical_and_copies():
    model, optimizer = _trained()
    twin = copy.deepcopy(model)
    twin_opt = Sassha(twin.parameters(), **KW)
    checkpoint.load_optimizer_state_dict(twin, twin_opt, checkpoint.optimizer_state_dict(model, optimizer))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key in ("momentum", "hessian_diag", "step", "hessian_updates"):
            assert torch.equal(optimizer.state[p][key], twin_opt.state[q][key])
            assert optimizer.state[p][key] is not twin_opt.state[q][key]
    train(model, optimizer, range(4, 7), 0, 1)
    train(twin, twin_opt, range(4, 7), 0, 1)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_param_groups_are_matched_by_name_and_restore_hyperparameters(tmp_path):
    model = make_model()
    params = dict(model.named_parameters())
    first = [params["0.weight"], params["0.bias"]]
    rest = [p for n, p in params.items() if not n.startswith("0.")]
    optimizer = Sassha([{"params": first, "lr": 0.02}, {"params": rest}], **KW)
    train(model, optimizer, range(1, 3), 0, 1)
    optimizer.param_groups[1]["lr"] = 0.01  # as a scheduler would
    checkpoint.save(tmp_path / "ckpt", model, optimizer)
    fresh = make_model(seed=3)
    fresh_params = dict(fresh.named_parameters())
    fresh_opt = Sassha(
        [
            {"params": [fresh_params["0.weight"], fresh_params["0.bias"]]},
            {"params": list(fresh_params.values())[2:]},
        ],
        **KW,
    )
    checkpoint.load(tmp_path / "ckpt", fresh, fresh_opt)
    assert [g["lr"] for g in fresh_opt.param_groups] == [0.02, 0.01]
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.999)
    # Groups split differently: refused, nothing changed.
    other = make_model(seed=3)
    other_opt = Sassha(
        [{"params": list(other.parameters())[:3]}, {"params": list(other.parameters())[3:]}], **KW
    )
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="param group 0"):
        checkpoint.load(tmp_path / "ckpt", other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))
    assert len(other_opt.state) == 0


def test_frozen_parameters_stay_stateless_through_a_dcp_round_trip(tmp_path):
    model = make_model()
    model[2].requires_grad_(False)
    optimizer = Sassha(model.parameters(), **KW)
    train(model, optimizer, range(1, 3), 0, 1)
    checkpoint.save(tmp_path / "ckpt", model, optimizer)
    fresh = make_model(seed=5)
    fresh[2].requires_grad_(False)
    fresh_opt = Sassha(fresh.parameters(), **KW)
    checkpoint.load(tmp_path / "ckpt", fresh, fresh_opt)
    assert all(p not in fresh_opt.state for p in fresh[2].parameters())
    assert all(p in fresh_opt.state for p in fresh[0].parameters())
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bf16_state_stays_fp32_through_dcp(tmp_path):
    model = make_model().to(torch.bfloat16)
    optimizer = Sassha(model.parameters(), lr=0.01, rho=0.01, lazy_hessian=2)
    x, y = (t.to(torch.bfloat16) for t in global_batch(0))
    for _ in range(3):
        optimizer.step(lambda: nn.functional.mse_loss(model(x), y))
    checkpoint.save(tmp_path / "ckpt", model, optimizer)
    fresh = make_model(seed=2).to(torch.bfloat16)
    fresh_opt = Sassha(fresh.parameters(), lr=0.01, rho=0.01, lazy_hessian=2)
    checkpoint.load(tmp_path / "ckpt", fresh, fresh_opt)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert fresh_opt.state[q]["momentum"].dtype == torch.float32
        assert torch.equal(fresh_opt.state[q]["hessian_diag"], optimizer.state[p]["hessian_diag"])
    assert not math.isnan(float(fresh_opt.step(lambda: nn.functional.mse_loss(fresh(x), y))))


def test_torch_state_dict_functions_work_on_plain_sassha(tmp_path):
    """torch's get/set_optimizer_state_dict on a plain Sassha (not only the Trainer's): the empty
    optimizer's state is initialised through step() (zero gradients, lr 0), the counters travel
    in the param groups, and the loaded optimizer continues bit for bit."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = make_mlp((3, 5, 1))
    batch = make_batches(1, batch=8)[0]
    opt = Sassha(model.parameters(), lr=0.05, lazy_hessian=2)
    for _ in range(3):
        opt.step(closure_for(model, batch))
    saved = get_optimizer_state_dict(model, opt)
    assert all(g[state_keys.COUNTERS][state_keys.GLOBAL_STEP] == 3 for g in saved["param_groups"])

    twin = make_mlp((3, 5, 1))
    twin.load_state_dict(model.state_dict())
    fresh = Sassha(twin.parameters(), lr=0.05, lazy_hessian=2)
    empty = get_optimizer_state_dict(twin, fresh)  # initialises the empty state through step()
    assert all(float(s[state_keys.STEP]) == 0 for s in empty["state"].values())
    fresh = Sassha(twin.parameters(), lr=0.05, lazy_hessian=2)
    set_optimizer_state_dict(twin, fresh, saved)
    assert fresh.counters == opt.counters
    for _ in range(3):
        opt.step(closure_for(model, batch))
        fresh.step(closure_for(twin, batch))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs a closure"):
        fresh.step()  # not the initialisation pattern (state exists): a closure is required
