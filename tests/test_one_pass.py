"""One forward-backward per step while rho = 0, under every engine and the Trainer.

With ``rho = 0`` in every parameter group on a step, theta + eps = theta: the gradient at theta is
also the perturbed gradient, so the step runs one pass (plus the Hessian work on refresh steps:
exact products fused into that pass, or the finite-difference passes at theta). The reference
oracle still computes such a step the two-pass way (the "perturbed" gradient at theta + 0 =
theta), so each test below states that the one-pass trajectory is the two-pass one to rounding,
and counts the closure calls (passes) per step.

The rho schedule is 0 on steps 1..4 and 0.05 from step 5 (:data:`RHO`): with ``lazy_hessian``
2 (3) the one-pass phase holds refresh steps 1 and 3 (1 and 4) and plain steps, and the two-pass
phase after it refreshes again.

Tolerances (measured with this file's settings; "needed atol": the least ``atol`` that passes at
the stated ``rtol``):

* float64, single device: ``rtol=1e-10, atol=1e-11`` on loss and parameters after every step and
  ``rtol=1e-10, atol=1e-12`` on m and D at the end, the bounds of tests/test_optimizer.py's
  oracle runs (the two implementations differ only in the order of operations). Measured over
  model seeds 5-20: exact max 3.6e-15 absolute, finite differences 2.0e-13 (two micro-batches,
  whose half-batch sums differ from the oracle's full-batch mean by rounding that the difference
  quotient divides by h); rtol alone passes every element.
* float32, exact Hessian: ``rtol=1e-5, atol=1e-6``. Measured over model seeds 5-20: max 2.4e-6
  absolute on O(1) values (a few ulps; 4.8e-7 on the parameters in the rho = 0 phase), needed
  atol 9.4e-8: a 10x margin.
* float32, finite differences: tests/test_deepspeed.py's fp32 bound ``rtol=1e-5, atol=5e-5``
  with its ``fd_step=1e-2`` (fp32 needs a larger step than 1e-3). Measured over model seeds
  5-20: needed atol 8.3e-7 with one closure, 1.0e-6 with the mixed groups (>48x margin). With
  two micro-batches the half-batch rounding divided by h needs 5.8e-5 on the worst seed (a
  one-probe D element near zero), more than the bound: this file's seed 5 needs 3.0e-8.
* Engines: the tolerance of each engine's own file, justified there: DDP ``rtol=1e-10`` (measured
  here 6.7e-16 absolute), FSDP2 and FSDP1 ``rtol=1e-9`` (2.4e-13), ZeRO 1/2/3 fp32 ``atol=5e-5,
  rtol=1e-5`` (2.8e-6, losses 4.3e-7 relative).
* The Trainer: tests/test_transformers_integration.py's float64 bounds on weights, ``rtol=1e-9,
  atol=1e-10``, against a plain ``Sassha.step(closures)`` loop on the same batches (measured
  4.2e-14).

A real error is far above all of these: the same runs against the oracle with a constant
``rho=0.05`` (no one-pass phase) differ by 3e-2 (ZeRO) to 1.4e-1 (FSDP2), and a one-pass step
whose products came from another point, another probe or a missed refresh moves the parameters
by 1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sassha_dist import Sassha
from sassha_dist import state_keys as keys
from sassha_dist.reference import ReferenceConfig, ReferenceSassha
from sassha_dist.schedules import PiecewiseConstant
from tests.distributed import run_ranks
from tests.helpers import make_batches, make_mlp, mse, reference_loss_fn, reference_params, trainer_arguments

pytestmark = pytest.mark.usefixtures("one_thread")

#: 0 on steps 1..4 (one pass per step), 0.05 from step 5 (two passes).
RHO = PiecewiseConstant((0.0, 0.05), (4,))
ZERO_STEPS = 4
MLP = (3, 6, 4, 1)
STEPS = 10
COMMON = {"lr": 0.05, "betas": (0.9, 0.99), "rho": RHO, "weight_decay": 0.01, "lazy_hessian": 2}
FP32_FD_STEP = 1e-2  # tests/test_deepspeed.py's fp32 step
TOLERANCES = {
    (torch.float64, "exact"): {"rtol": 1e-10, "atol": 1e-11},
    (torch.float64, "finite_difference"): {"rtol": 1e-10, "atol": 1e-11},
    (torch.float32, "exact"): {"rtol": 1e-5, "atol": 1e-6},
    (torch.float32, "finite_difference"): {"rtol": 1e-5, "atol": 5e-5},
}


def _passes(one_pass: bool, refreshed: bool, method: str, n_samples: int) -> int:
    """Closure calls of one step (per micro-batch): 1 or 2, plus 2 per probe on FD refresh steps."""
    fd = 2 * n_samples if refreshed and method == "finite_difference" else 0
    return (1 if one_pass else 2) + fd


def _counting(loss_of, calls: list[int]):
    """A closure that counts its calls in ``calls[-1]`` (the current step's entry)."""

    def closure():
        calls[-1] += 1
        return loss_of()

    return closure


# -- single device --------------------------------------------------------------------------


def _groups(layout: str):
    """The param groups of ``layout``; ``mixed``: rho 0 throughout in the first group, the
    schedule in the second, so only the schedule's zero phase is one-pass."""
    if layout == "mixed":
        return lambda ps: [{"params": ps[:2], "rho": 0.0, "weight_decay": 0.0}, {"params": ps[2:]}]
    return lambda ps: ps


def _single_device_run(dtype, method: str, layout: str, n_samples: int = 1, seed: int = 5):
    """Sassha and the oracle side by side, compared after every step (loss and parameters).

    Returns per step: whether ``one_pass_due()`` was true before it, whether it refreshed the
    Hessian, and the closure calls it made (all micro-batches together)."""
    model = make_mlp(MLP, dtype=dtype, seed=seed)
    ref_params = reference_params(model)
    loss_fn = reference_loss_fn(model)
    kw = {**COMMON, "hessian_method": method, "n_samples": n_samples}
    if method == "finite_difference" and dtype == torch.float32:
        kw["fd_step"] = FP32_FD_STEP
    groups_of = _groups(layout)
    opt = Sassha(groups_of(list(model.parameters())), **kw)
    ref = ReferenceSassha(groups_of(ref_params), ReferenceConfig(**kw))
    tol = TOLERANCES[dtype, method]
    records, calls = [], []
    for batch in make_batches(STEPS, in_dim=MLP[0], dtype=dtype, seed=seed + 1):
        x, y = batch
        if layout == "accumulation":  # two micro-batches of 4 rows, each returning its share
            halves = ((x[:4], y[:4]), (x[4:], y[4:]))
            closure = [_counting(lambda part=part: 0.5 * mse(model, part), calls) for part in halves]
        else:
            closure = _counting(lambda batch=batch: mse(model, batch), calls)
        calls.append(0)
        one_pass = opt.one_pass_due()
        loss = opt.step(closure)
        ref_loss = ref.step(loss_fn, [batch])
        records.append((one_pass, opt.last_report.hessian_refreshed, calls[-1]))
        torch.testing.assert_close(loss, torch.tensor(ref_loss, dtype=loss.dtype), **tol)
        for p, q in zip(model.parameters(), ref_params, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), **tol)
    assert opt.counters[keys.GLOBAL_STEP] == ref.step_count == STEPS
    assert opt.counters[keys.HESSIAN_REFRESHES] == ref.hessian_refreshes == STEPS // 2
    if dtype == torch.float64:  # m and D: tests/test_optimizer.py's bound
        for p, m, d in zip(model.parameters(), ref.m, ref.D, strict=True):
            torch.testing.assert_close(opt.state[p][keys.MOMENTUM], m, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt.state[p][keys.HESSIAN_DIAG], d, rtol=1e-10, atol=1e-12)
    return records


@pytest.mark.parametrize("layout", ["one closure", "accumulation", "mixed"])
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_single_device_matches_the_reference(dtype, method, layout):
    """The one-pass steps (rho = 0) and the two-pass steps after them follow the oracle's two-pass
    trajectory, and each step makes exactly its passes' closure calls: exact Hessian 1 per step
    while rho = 0 and 2 after; central differences (one probe) 2 more on refresh steps. A group
    with rho 0 next to one with rho > 0 makes the step two-pass."""
    records = _single_device_run(dtype, method, layout)
    micro = 2 if layout == "accumulation" else 1
    assert [one for one, _, _ in records] == [t <= ZERO_STEPS for t in range(1, STEPS + 1)]
    assert [refreshed for _, refreshed, _ in records] == [t % 2 == 1 for t in range(1, STEPS + 1)]
    for one_pass, refreshed, calls in records:
        assert calls == micro * _passes(one_pass, refreshed, method, 1)
    if method == "exact":
        assert [calls for _, _, calls in records] == [micro] * ZERO_STEPS + [2 * micro] * (STEPS - ZERO_STEPS)


def test_groups_with_nonzero_rho_are_two_pass():
    """rho 0 in one group and 0.05 in the other on every step: never one pass, and the oracle agrees
    (the first group is not moved by the ascent, the second is)."""
    model = make_mlp(MLP, seed=5)
    ref_params = reference_params(model)

    def groups(ps):
        return [{"params": ps[:2], "rho": 0.0}, {"params": ps[2:], "rho": 0.05}]

    kw = {**COMMON, "hessian_method": "exact"}
    opt = Sassha(groups(list(model.parameters())), **kw)
    ref = ReferenceSassha(groups(ref_params), ReferenceConfig(**kw))
    loss_fn = reference_loss_fn(model)
    for batch in make_batches(4, in_dim=MLP[0], seed=6):
        calls = []
        assert not opt.one_pass_due()
        opt.step(lambda batch=batch, calls=calls: calls.append(1) or mse(model, batch))
        ref.step(loss_fn, [batch])
        assert len(calls) == 2
        for p, q in zip(model.parameters(), ref_params, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float64, "exact"])


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_pass_by_pass_on_a_one_pass_step(method):
    """``gradient_pass`` is the only pass; ``perturb`` moves nothing (bit for bit) and
    ``perturbed_pass`` calls no closure. On an FD refresh step ``hessian_pass`` makes the 2 central
    passes at theta. If the gradient at theta comes from the loop's own backward on an exact refresh
    step, nothing was fused, so ``perturbed_pass`` makes one pass for the products. Every variant
    lands on the oracle's two-pass step (float64 bound above)."""
    kw = {**COMMON, "rho": 0.0, "hessian_method": method}
    batch = make_batches(1, in_dim=MLP[0], seed=6)[0]
    ref_model = make_mlp(MLP, seed=5)
    ref_params = reference_params(ref_model)
    ReferenceSassha(ref_params, ReferenceConfig(**kw)).step(reference_loss_fn(ref_model), [batch])
    for replaced in (False, True):
        model = make_mlp(MLP, seed=5)
        opt = Sassha(model.parameters(), **kw)
        calls = []

        def closure(calls=calls, model=model):
            calls.append(1)
            return mse(model, batch)

        assert opt.one_pass_due()
        if replaced:  # the loop's own backward leaves the gradient at theta in p.grad
            closure().backward()
            loss = None
        else:
            loss = opt.gradient_pass(closure)
        assert len(calls) == 1
        theta = [p.detach().clone() for p in model.parameters()]
        opt.perturb(loss)
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta, strict=True))
        opt.perturbed_pass(closure)
        assert len(calls) == (2 if replaced and method == "exact" else 1)
        before = len(calls)
        opt.hessian_pass(closure)
        assert len(calls) - before == (2 if method == "finite_difference" else 0)
        report = opt.update()
        assert report.hessian_refreshed and not report.skipped
        for p, q in zip(model.parameters(), ref_params, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float64, method])


# -- DDP, FSDP2, FSDP1: one launch of 2 gloo ranks -------------------------------------------

WORLD = 2


def _train_counted(optimizer, loss_of, steps: int) -> dict:
    """``steps`` steps of ``optimizer.step(closure)``: losses, and per step (one pass?, refreshed?, calls)."""
    calls: list[int] = []
    closure = _counting(loss_of, calls)
    losses, records = [], []
    for _ in range(steps):
        calls.append(0)
        one_pass = optimizer.one_pass_due()
        losses.append(optimizer.step(closure).item())
        records.append((one_pass, optimizer.last_report.hessian_refreshed, calls[-1]))
    return {"losses": losses, "records": records}


def _torch_engines(rank: int, world: int) -> dict[str, dict]:
    """DDP (exact, per-rank probes), FSDP2 and FSDP1 (central differences, global probes), each 20
    steps of tests/sharded.py's model and batches under the rho schedule."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sassha_dist.distributed import FlatShard, FullyShard, Replicated
    from tests import sharded

    x, y = sharded.batches(world)[rank]
    out = {}

    ddp_model = sharded.model()
    ddp = nn.parallel.DistributedDataParallel(ddp_model)
    optimizer = Sassha(ddp.parameters(), **{**sharded.KW, **DDP_KW})
    assert isinstance(optimizer.strategy, Replicated)
    out["ddp"] = _train_counted(optimizer, lambda: nn.functional.mse_loss(ddp(x), y), sharded.STEPS)
    out["ddp"]["params"] = [p.detach().clone() for p in ddp_model.parameters()]

    fsdp2 = sharded.fully_sharded(sharded.model(), world)
    optimizer = Sassha(fsdp2.parameters(), **{**sharded.KW, "rho": RHO})
    assert isinstance(optimizer.strategy, FullyShard)
    out["fsdp2"] = _train_counted(optimizer, lambda: nn.functional.mse_loss(fsdp2(x), y), sharded.STEPS)
    out["fsdp2"]["params"] = [p.full_tensor().detach().clone() for p in fsdp2.parameters()]

    fsdp1 = FullyShardedDataParallel(sharded.model(), device_id=torch.device("cpu"), use_orig_params=True)
    optimizer = Sassha(fsdp1.parameters(), strategy=FlatShard(fsdp1), **{**sharded.KW, "rho": RHO})
    out["fsdp1"] = _train_counted(optimizer, lambda: nn.functional.mse_loss(fsdp1(x), y), sharded.STEPS)
    with FullyShardedDataParallel.summon_full_params(fsdp1):
        out["fsdp1"]["params"] = [p.detach().clone() for p in fsdp1.parameters()]
    return out


DDP_KW = {"hessian_method": "exact", "probe_mode": "per_rank", "rho": RHO}
_LAUNCHES: dict[str, list] = {}


def _torch_engine_results(engine: str) -> list[dict]:
    if "torch" not in _LAUNCHES:
        _LAUNCHES["torch"] = run_ranks(_torch_engines, WORLD, timeout=180)
    return [per_rank[engine] for per_rank in _LAUNCHES["torch"]]


def _assert_counted(results: list[dict], method: str, n_samples: int, lazy: int, steps: int) -> None:
    """One pass per step on steps 1..ZERO_STEPS, two after, plus the FD passes on refresh steps;
    ``one_pass_due()`` as recorded before each step (``None``: not recorded)."""
    one_pass = [t <= ZERO_STEPS for t in range(1, steps + 1)]
    refreshed = [(t - 1) % lazy == 0 for t in range(1, steps + 1)]
    expected = [_passes(o, r, method, n_samples) for o, r in zip(one_pass, refreshed, strict=True)]
    for result in results:
        records = result["records"]
        recorded = [(one, o) for (one, _, _), o in zip(records, one_pass, strict=True) if one is not None]
        assert all(one == o for one, o in recorded)
        assert [r for _, r, _ in records] == refreshed
        assert [calls for _, _, calls in records] == expected


def _assert_like_reference(results: list[dict], rtol: float, **overrides) -> None:
    from tests import sharded

    ref_params, ref_losses = sharded.reference(WORLD, "central", **{"rho": RHO, **overrides})
    for result in results:
        for actual, expected in zip(result["params"], ref_params, strict=True):
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-12)
    mean_losses = [sum(r["losses"][t] for r in results) / WORLD for t in range(len(ref_losses))]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), rtol=rtol, atol=0)


def test_ddp_exact_one_pass():
    """DDP, exact Hessian with per-rank probes: 1 closure call per step while rho = 0 (products
    fused into the gradient pass, averaged by one all-reduce), 2 after; the oracle's W = 2
    emulation to tests/test_ddp.py's ``rtol=1e-10``."""
    from tests import sharded

    results = _torch_engine_results("ddp")
    _assert_counted(results, "exact", sharded.KW["n_samples"], sharded.KW["lazy_hessian"], sharded.STEPS)
    _assert_like_reference(results, rtol=1e-10, **{k: v for k, v in DDP_KW.items() if k != "rho"})


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_sharded_finite_difference_one_pass(engine):
    """FSDP2 and FSDP1, central differences with global probes: while rho = 0 one pass plus the
    4 difference passes at theta on refresh steps (n_samples=2), 2 + 4 after; the oracle to
    tests/test_fsdp2.py's ``rtol=1e-9``."""
    from tests import sharded

    results = _torch_engine_results(engine)
    _assert_counted(
        results, "finite_difference", sharded.KW["n_samples"], sharded.KW["lazy_hessian"], sharded.STEPS
    )
    _assert_like_reference(results, rtol=1e-9)


# -- DeepSpeed ZeRO 1/2/3: one launch of 2 gloo ranks ----------------------------------------


def _zero_stages(rank: int, world: int) -> dict[int, dict]:
    from tests import test_deepspeed as zero

    zero._init(rank)
    out = {}
    for stage in zero.STAGES:
        model, engine, sassha = zero._build(stage, {**zero.KW, "rho": RHO})
        batch = zero._batches(world)[rank]
        inner = sassha.optimizer
        calls: list[int] = []
        closure = _counting(zero._loss(engine, batch), calls)
        losses, records = [], []
        for _ in range(zero.STEPS):
            calls.append(0)
            # At stage 3 ZeroSassha's param_groups are empty outside the engine's step: the
            # answer must not depend on that.
            one_pass = inner.one_pass_due()
            losses.append(sassha.step(closure).item())
            records.append((one_pass, sassha.last_report.hessian_refreshed, calls[-1]))
        out[stage] = {
            "params": zero._full_params(model),
            "losses": losses,
            "records": records,
            "counters": dict(inner.counters),
        }
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_one_pass(stage):
    """The ZeRO driver, fp32: while rho = 0 the difference passes at theta, then the one pass
    whose gradient DeepSpeed keeps for its step; against the oracle at tests/test_deepspeed.py's
    fp32 tolerance (``ATOL=5e-5, RTOL=1e-5``, fd_step 1e-2)."""
    from tests import test_deepspeed as zero  # skips without deepspeed; sets DS_ACCELERATOR=cpu

    if "zero" not in _LAUNCHES:
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()  # compile DeepSpeed's op here once, so that the ranks only load it
        _LAUNCHES["zero"] = run_ranks(_zero_stages, WORLD, timeout=300)
    results = [per_rank[stage] for per_rank in _LAUNCHES["zero"]]
    _assert_counted(results, "finite_difference", zero.KW["n_samples"], zero.KW["lazy_hessian"], zero.STEPS)
    ref_params, ref_losses, ref = zero._reference(WORLD, rho=RHO)
    zero._assert_run_matches(results, ref_params, ref_losses)
    for result in results:
        assert result["counters"] == {
            keys.GLOBAL_STEP: zero.STEPS,
            keys.HESSIAN_REFRESHES: ref.hessian_refreshes,
            keys.SKIPPED_STEPS: 0,
        }


# -- the Trainer -----------------------------------------------------------------------------

BLOCK, BATCH, ACCUM, TRAINER_STEPS, LR = 16, 2, 2, 4, 0.05


def test_trainer_runs_one_forward_per_micro_batch(tmp_path):
    """``optim_args="rho=0,hessian_method=exact"``: every optimizer step runs one forward per
    micro-batch (the exact products of refresh steps come from that pass), and the weights equal a
    plain ``Sassha.step(closures)`` loop on the same batches, in the same parameter groups
    (float64; tests/test_transformers_integration.py's bounds)."""
    from transformers import TrainerCallback

    from sassha_dist.integrations.embedded import BlockDataset, tiny_gpt2
    from sassha_dist.integrations.transformers import SasshaTrainer

    def gpt2() -> nn.Module:
        return tiny_gpt2(seed=0, n_positions=BLOCK).double()

    blocks = torch.randint(
        0, 256, (BATCH * ACCUM * TRAINER_STEPS, BLOCK), generator=torch.Generator().manual_seed(0)
    )
    model = gpt2()
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    per_step: list[int] = []

    class PerStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            per_step.append(forwards[0] - sum(per_step))

    args = trainer_arguments(
        tmp_path / "out",
        optim_args="rho=0,hessian_method=exact,lazy_hessian=2",
        learning_rate=LR,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        max_steps=TRAINER_STEPS,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_grad_norm=0.0,
    )
    trainer = SasshaTrainer(model=model, args=args, train_dataset=BlockDataset(blocks), callbacks=[PerStep()])
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert optimizer.one_pass_due() and optimizer.hessian_method == "exact"
    assert per_step == [ACCUM] * TRAINER_STEPS
    assert optimizer.counters == {
        keys.GLOBAL_STEP: TRAINER_STEPS,
        keys.HESSIAN_REFRESHES: TRAINER_STEPS // 2,
        keys.SKIPPED_STEPS: 0,
    }

    # The plain loop, in the Trainer's parameter groups (probe ordinals follow their order).
    plain = gpt2()
    plain.train()
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = dict(plain.named_parameters())
    groups = [
        {"params": [by_name[names[id(p)]] for p in group["params"]], "weight_decay": group["weight_decay"]}
        for group in optimizer.param_groups
    ]
    reference = Sassha(groups, lr=LR, rho=0.0, hessian_method="exact", lazy_hessian=2)
    calls = [0]
    for step in range(TRAINER_STEPS):
        window = blocks[step * BATCH * ACCUM : (step + 1) * BATCH * ACCUM].split(BATCH)

        def closure(b):
            def call():
                calls[0] += 1
                return plain(input_ids=b, labels=b).loss / ACCUM

            return call

        reference.step([closure(b) for b in window])
    assert calls[0] == ACCUM * TRAINER_STEPS
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), by_name[name].detach(), rtol=1e-9, atol=1e-10, msg=name)
