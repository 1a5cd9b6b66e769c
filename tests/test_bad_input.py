"""Bad input: one test per row of docs/bad_input.md that is not already covered elsewhere.

Rows already tested in tests/test_validation.py, tests/test_optimizer.py,
tests/test_fsdp1.py, tests/test_checkpoint.py or tests/test_restart.py are only
referenced from the table, not repeated here.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from sassha_dist import Sassha, checkpoint
from sassha_dist import state_keys as keys
from tests.distributed import run_ranks
from tests.helpers import assert_same, make_batches, make_mlp, mse, snapshot

MLP = (3, 6, 4, 1)
COMMON = {"lr": 0.05, "betas": (0.9, 0.99), "rho": 0.05, "weight_decay": 0.01, "lazy_hessian": 2}


def _train(model, opt, batches, loss=mse):
    for batch in batches:
        opt.step(lambda batch=batch: loss(model, batch))


# -- parameters of mixed dtypes or devices in one group: supported ----------------------------------------


class _Mixed(nn.Module):
    """Three layers in three dtypes (or on two devices); activations are cast between them."""

    def __init__(self, dtypes, devices):
        super().__init__()
        base = make_mlp(MLP, dtype=torch.float64)
        self.layers = nn.ModuleList(
            base[i].to(device=device, dtype=dtype) for i, dtype, device in zip((0, 2, 4), dtypes, devices)
        )

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            w = layer.weight
            x = layer(x.to(device=w.device, dtype=w.dtype))
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x.to(device="cpu", dtype=torch.float64)


def _mixed_runs(dtypes, devices, **kw):
    batches = make_batches(5, in_dim=MLP[0])
    runs = []
    for grouping in ("one group", "one group per layer"):
        model = _Mixed(dtypes, devices)
        groups = (
            [{"params": list(model.parameters())}]
            if grouping == "one group"
            else [{"params": list(layer.parameters())} for layer in model.layers]
        )
        opt = Sassha(groups, **{**COMMON, **kw})
        _train(model, opt, batches)
        assert opt.skipped_steps == 0
        runs.append(snapshot([p.cpu() for p in model.parameters()], None) | _state(opt, model))
    return runs


def _state(opt, model):
    return {
        "state": [{k: v.cpu() for k, v in opt.state[p].items()} for p in model.parameters()],
        "counters": dict(opt.counters),
    }


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("hessian_method", ["exact", "finite_difference"])
def test_mixed_dtypes_in_one_group_equal_separate_groups(foreach, hessian_method):
    """fp64, bf16 and fp32 parameters in one group: the kernels bucket by (device, dtype), state is
    fp32 for bf16, and the trajectory is bit for bit that of one group per dtype."""
    dtypes = (torch.float64, torch.bfloat16, torch.float32)
    one, separate = _mixed_runs(dtypes, ("cpu",) * 3, foreach=foreach, hessian_method=hessian_method)
    assert_same(one, separate)
    assert [s[keys.MOMENTUM].dtype for s in one["state"][2:4]] == [torch.float32] * 2  # bf16 -> fp32 state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device next to the CPU")
@pytest.mark.parametrize("first", ["cuda", "cpu"])
def test_mixed_devices_in_one_group_equal_separate_groups(first):
    """CUDA and CPU parameters in one group (either device first): same result as separate groups."""
    other = "cpu" if first == "cuda" else "cuda"
    devices = (first, other, first)
    one, separate = _mixed_runs((torch.float64,) * 3, devices, foreach=True)
    assert_same(one, separate)


# -- closures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first call", "perturbed pass"])
def test_closure_returning_none_raises_and_changes_nothing(where):
    model = make_mlp(MLP)
    opt = Sassha(model.parameters(), **COMMON)
    batch = make_batches(1, in_dim=MLP[0])[0]
    _train(model, opt, [batch])
    before = snapshot(model, opt)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = mse(model, batch)
        if where == "first call" or calls["n"] > 1:
            return None  # forgot the return
        return loss

    with pytest.raises(TypeError, match="NoneType"):
        opt.step(closure)
    assert_same(snapshot(model, opt), before)


def test_loss_ignoring_some_parameters_under_finite_differences():
    """Parameters the loss does not reach get no gradient: untouched, no state, and the finite-difference
    probes and step size are taken over the parameters that take part (the exact-Hessian case is
    tests/test_optimizer.py::test_frozen_and_unused_parameters_are_untouched_and_stateless_until_used)."""
    model = make_mlp(MLP)
    unused = nn.Linear(4, 2).double()
    opt = Sassha([*model.parameters(), *unused.parameters()], **COMMON, hessian_method="finite_difference")
    before = [p.clone() for p in unused.parameters()]
    _train(model, opt, make_batches(4, in_dim=MLP[0]))
    assert all(torch.equal(p, q) and p not in opt.state for p, q in zip(unused.parameters(), before))
    # ... and the used parameters follow exactly the run that never listed the unused ones.
    alone = make_mlp(MLP)
    alone_opt = Sassha(alone.parameters(), **COMMON, hessian_method="finite_difference")
    _train(alone, alone_opt, make_batches(4, in_dim=MLP[0]))
    assert_same(snapshot(model, opt), snapshot(alone, alone_opt))


# -- non-finite Hessian (finite loss and gradients) --------------------------------------------------------


class _Ones(torch.autograd.Function):
    """``ones_like(x)`` whose derivative is NaN."""

    @staticmethod
    def forward(ctx, x):
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.nan)


class _NanCurvature(torch.autograd.Function):
    """The identity, with a finite first derivative and a NaN second derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * _Ones.apply(x)


def _nan_curvature_loss(model, batch):
    x, y = batch
    return ((_NanCurvature.apply(model(x)) - y) ** 2).mean()


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_nan_only_in_the_exact_hessian_skips_the_step(on_nonfinite):
    model = make_mlp(MLP)
    kw = {**COMMON, "lazy_hessian": 1, "hessian_method": "exact", "on_nonfinite": on_nonfinite}
    opt = Sassha(model.parameters(), **kw)
    batches = make_batches(3, in_dim=MLP[0])
    _train(model, opt, batches[:2])
    before = snapshot(model, opt)
    # The gradient of this loss is finite (it is the plain MSE gradient) ...
    probe = make_mlp(MLP)
    _nan_curvature_loss(probe, batches[2]).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in probe.parameters())
    # ... but its Hessian-vector products are NaN.
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="Hessian estimate"):
            opt.step(lambda: _nan_curvature_loss(model, batches[2]))
    else:
        opt.step(lambda: _nan_curvature_loss(model, batches[2]))
        assert opt.last_report.skipped and opt.last_report.reason == "non-finite Hessian estimate"
    before["counters"][keys.SKIPPED_STEPS] = 1
    assert_same(snapshot(model, opt), before)


# -- parameters Sassha refuses -----------------------------------------------------------------------------


def test_empty_or_repeated_parameters_raise():
    with pytest.raises(ValueError, match="empty parameter list"):
        Sassha([])
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        Sassha([{"params": [p]}, {"params": [p]}])


def test_complex_parameters_raise():
    real = nn.Parameter(torch.randn(3))
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        Sassha([real, z])
    opt = Sassha([real])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


# -- saving and loading ----------------------------------------------------------------------------------


def _stepped_pair():
    model = make_mlp(MLP)
    opt = Sassha(model.parameters(), **COMMON)
    _train(model, opt, make_batches(2, in_dim=MLP[0]))
    return model, opt


def test_load_state_dict_inside_a_step_raises():
    model, opt = _stepped_pair()
    saved = opt.state_dict()
    batch = make_batches(1, in_dim=MLP[0])[0]
    opt.perturb(opt.gradient_pass(lambda: mse(model, batch)))
    with pytest.raises(RuntimeError, match="inside a step"):
        opt.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="inside a step"):
        checkpoint.optimizer_state_dict(model, opt)  # and so checkpoint.save
    opt.cancel()


def test_fqn_state_of_another_optimizer_raises():
    model, opt = _stepped_pair()
    adamw = torch.optim.AdamW(model.parameters())
    mse(model, make_batches(1, in_dim=MLP[0])[0]).backward()
    adamw.step()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="another optimizer"):
        checkpoint.load_optimizer_state_dict(model, opt, get_optimizer_state_dict(model, adamw))
    with pytest.raises(ValueError, match=r"load_state_dict\(\)"):  # integer-keyed: the hint says which API
        checkpoint.load_optimizer_state_dict(model, opt, opt.state_dict())
    assert_same(snapshot(model, opt), before)
    with pytest.raises(TypeError, match="Sassha"):
        checkpoint.optimizer_state_dict(model, adamw)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_checkpoint_not_written_by_sassha_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = make_mlp(MLP)
    adamw = torch.optim.AdamW(model.parameters())
    mse(model, make_batches(1, in_dim=MLP[0])[0]).backward()
    adamw.step()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, adamw)}
    dcp.save(state, checkpoint_id=tmp_path / "adamw")
    fresh, fresh_opt = _stepped_pair()
    with pytest.raises(checkpoint.CorruptCheckpointError, match="not written by sassha_dist"):
        checkpoint.load(tmp_path / "adamw", fresh, fresh_opt)


@pytest.mark.parametrize("other", [(3, 7, 4, 1), (3, 6, 4, 4, 1)], ids=["other shapes", "other names"])
def test_checkpoint_of_another_model_is_refused_and_changes_nothing(tmp_path, other):
    model, opt = _stepped_pair()
    checkpoint.save(tmp_path / "ckpt", model, opt)
    full = checkpoint.export_full(tmp_path / "full.pt", model, opt)
    wrong = make_mlp(other)
    wrong_opt = Sassha(wrong.parameters(), **COMMON)
    before = snapshot(wrong, wrong_opt)
    with pytest.raises(ValueError, match="another model"):
        checkpoint.load(tmp_path / "ckpt", wrong, wrong_opt)
    with pytest.raises(ValueError, match="another model"):
        checkpoint.import_full(full, wrong, wrong_opt)
    with pytest.raises(ValueError, match="another model"):
        checkpoint.load_optimizer_state_dict(wrong, wrong_opt, checkpoint.optimizer_state_dict(model, opt))
    assert_same(snapshot(wrong, wrong_opt), before)


# -- engine configurations Sassha cannot serve, and one rank's bad value (2 gloo ranks) ------------------


class _Net(nn.Module):
    def __init__(self, extra_head: bool):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
        self.unused = nn.Linear(5, 2).double() if extra_head else None  # never called in forward

    def forward(self, x):
        return self.body(x)


def _fsdp2_model(world: int, extra_head: bool = False) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _Net(extra_head)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _error(build) -> str:
    try:
        build()
    except (ValueError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _engine_cases(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sassha_dist.distributed import FlatShard, FullyShard

    model = _fsdp2_model(world)
    plain = nn.Linear(3, 1).double()
    flat = FullyShardedDataParallel(
        nn.Linear(3, 1).double(), device_id=torch.device("cpu"), use_orig_params=False
    )
    out = {
        "exact without module": _error(lambda: Sassha(model.parameters(), hessian_method="exact")),
        "local perturbation": _error(
            lambda: Sassha(
                model.parameters(),
                hessian_method="exact",
                local_perturbation=True,
                strategy=FullyShard(model.parameters(), module=model),
            )
        ),
        "module not fully_shard-ed": _error(lambda: FullyShard(model.parameters(), module=plain)),
        "plain params for FullyShard": _error(lambda: FullyShard(plain.parameters())),
        "FSDP1 flat parameters": _error(lambda: Sassha(flat.parameters())),
        "FlatShard without use_orig_params": _error(lambda: FlatShard(flat)),
    }
    return out


@pytest.fixture(scope="module")
def engine_cases():
    return run_ranks(_engine_cases, 2, timeout=120)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("exact without module", r"ValueError: .*hessian_method='exact'.*module=model"),
        ("local perturbation", r"ValueError: Invalid local_perturbation=True under FullyShard"),
        ("module not fully_shard-ed", r"ValueError: .*fully_shard"),
        ("plain params for FullyShard", r"ValueError: .*DTensor"),
        ("FSDP1 flat parameters", r"ValueError: .*FlatShard\(fsdp_model\).*use_orig_params=True"),
        ("FlatShard without use_orig_params", r"ValueError: .*use_orig_params=True"),
    ],
)
def test_engine_configuration_sassha_cannot_serve_raises(engine_cases, case, expected):
    for result in engine_cases:
        assert re.search(expected, result[case]), result[case]


def test_data_parallel_strategy_without_a_process_group_raises():
    from sassha_dist.distributed import Replicated

    with pytest.raises(ValueError, match="process group"):
        Replicated()


def _one_rank_nan_run(rank: int, world: int, on_nonfinite: str) -> dict:
    """Rank 1's loss value is NaN at step 3 (its gradient is finite): a local check fails on rank 1 only."""
    model = _fsdp2_model(world, extra_head=True)
    opt = Sassha(model.parameters(), lr=0.05, rho=0.05, lazy_hessian=2, on_nonfinite=on_nonfinite)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 1, generator=gen).double()
    unused_before = [p.full_tensor().clone() for p in model.unused.parameters()]

    def closure(poison: bool):
        loss = nn.functional.mse_loss(model(x), y)
        return loss + torch.tensor(math.nan, dtype=loss.dtype) if poison else loss

    for _ in range(2):
        opt.step(lambda: closure(False))

    def shot():
        entries = [opt.state.get(p, {}) for p in model.parameters()]  # .get: opt.state is a defaultdict
        state = [v.to_local().clone() for entry in entries for v in entry.values() if v.dim()]
        return [p.to_local().clone() for p in model.parameters()] + state, dict(opt.counters)

    (tensors_before, counters_before) = shot()
    raised = None
    try:
        opt.step(lambda: closure(rank == 1))
    except FloatingPointError as error:
        raised = str(error)
    tensors_after, counters_after = shot()
    unchanged = all(torch.equal(a, b) for a, b in zip(tensors_before, tensors_after, strict=True))
    opt.step(lambda: closure(False))  # and training goes on in step
    return {
        "raised": raised,
        "unchanged": unchanged and counters_after == {**counters_before, keys.SKIPPED_STEPS: 1},
        "global_step": opt.counters[keys.GLOBAL_STEP],
        "params": [p.full_tensor() for p in model.parameters()],
        "unused_untouched": all(
            torch.equal(p.full_tensor(), q) and p not in opt.state
            for p, q in zip(model.unused.parameters(), unused_before, strict=True)
        ),
    }


def _one_rank_nan(rank: int, world: int) -> dict:
    return {mode: _one_rank_nan_run(rank, world, mode) for mode in ("skip", "raise")}


@pytest.fixture(scope="module")
def one_rank_nan():
    return run_ranks(_one_rank_nan, 2, timeout=120)


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_a_non_finite_value_on_one_rank_skips_the_step_on_every_rank(one_rank_nan, on_nonfinite):
    """FSDP2, W=2: one all-reduced flag makes every rank take the same decision (skip, or raise), so the
    shards stay consistent and nobody hangs in the next step's collectives. The unused head of the
    model (no gradient on any rank) is untouched and stateless."""
    results = [by_mode[on_nonfinite] for by_mode in one_rank_nan]
    for result in results:
        assert result["unchanged"]  # parameters, m and D on this rank's shards; counters but skipped_steps
        assert result["global_step"] == 3
        assert (result["raised"] is not None) == (on_nonfinite == "raise")
        assert result["unused_untouched"]
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(a, b)
