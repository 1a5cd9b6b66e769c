"""M-SASSHA (``perturbation="momentum"``): one forward-backward per step, under every engine.

The ascent follows the momentum: step t takes its one pass at ``w~ = w - rho m / (||m|| + eps)``
(m as the previous step left it; ``w~ = w`` on the first step), restores the exact saved w and
updates it as SASSHA does. The parameters hold w between steps (``Sassha.ascend`` moves them at
the start of the step, not at the end of the previous one, as the authors' file does: the same
points, computed from the same w and m).

The problem is separable and not quadratic, so its Hessian is diagonal and changes with the
point: ``loss = mean_b sum_i softplus(x_bi w_i) + 0.05 sum_i w_i^4`` over 18 weights held as
tensors of 7x2, 3 and 1 elements (uneven and empty shards at W = 2 and 3). A step whose
gradient or Hessian came from the wrong point is far off: the single-device runs with
``perturbation="gradient"`` end 0.19 from this oracle, and the image recipe 0.64 from the
authors' loop below.

Tolerances: the bounds of each engine's own test file, justified there, and measured here:

* float64, single device, against the oracle (tests/test_optimizer.py's ``rtol=1e-10,
  atol=1e-11``): measured 7.8e-16 (exact), 5.4e-15 (finite differences), 10 steps.
* float64, against the authors' loop transcribed below (eager ascent at the end of each step,
  undone by the saved w): the same bound; measured 2.5e-16 after 25 steps.
* DDP ``rtol=1e-10``, FSDP2 and FSDP1 ``rtol=1e-9`` with ``atol=1e-12`` (tests/test_fsdp2.py,
  tests/test_ddp.py); ZeRO 1/2/3 in fp32 tests/test_deepspeed.py's ``atol=5e-5, rtol=1e-5`` with
  its ``fd_step=1e-2``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sassha_dist import Sassha
from sassha_dist import state_keys as keys
from sassha_dist.reference import ReferenceConfig, ReferenceSassha
from tests.distributed import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = ((7, 2), (3,), (1,))
FEATURES = 18
STEPS = 10
EXACT_TOL = {"rtol": 1e-10, "atol": 1e-11}
KW = {"lr": 0.05, "betas": (0.9, 0.99), "rho": 0.3, "weight_decay": 0.01, "lazy_hessian": 3}


class Separable(nn.Module):
    """``mean_b sum_i softplus(x_bi w_i) + 0.05 sum_i w_i^4``: a diagonal Hessian that depends on w."""

    def __init__(self, dtype=torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        # drawn in float64 and cast, so the fp32 model starts where the float64 oracle does
        self.a = nn.Parameter(torch.randn(SHAPES[0], generator=g, dtype=torch.float64).to(dtype))
        self.b = nn.Parameter(torch.randn(SHAPES[1], generator=g, dtype=torch.float64).to(dtype))
        self.c = nn.Parameter(torch.randn(SHAPES[2], generator=g, dtype=torch.float64).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat([self.a.reshape(-1), self.b, self.c])
        return nn.functional.softplus(x * w).mean(0).sum() + 0.05 * (w**4).sum()


def batches(count: int, rows: int = 12, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, FEATURES, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]


def reference(
    world: int, steps: int = STEPS, groups=None, **config
) -> tuple[list[torch.Tensor], list[float], object]:
    """The oracle over ``world`` emulated ranks (one batch each), on a twin of :class:`Separable`."""
    twin = Separable()
    names = [n for n, _ in twin.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in twin.parameters()]
    by_id = {id(p): n for n, p in zip(names, params, strict=True)}

    def loss_fn(ps, x):
        return torch.func.functional_call(twin, {by_id[id(p)]: p for p in ps}, (x,))

    ref = ReferenceSassha(params if groups is None else groups(params), ReferenceConfig(**config))
    per_rank = batches(world)
    losses = [ref.step(loss_fn, per_rank) for _ in range(steps)]
    return [p.detach() for p in params], losses, ref


def _counting(loss_of, calls: list[int]):
    def closure():
        calls[-1] += 1
        return loss_of()

    return closure


# -- single device ---------------------------------------------------------------------------


def _two_groups(ps):
    return [{"params": ps[:1], "rho": 0.1, "weight_decay": 0.0}, {"params": ps[1:]}]


@pytest.mark.parametrize("layout", ["one closure", "accumulation", "groups"])
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_single_device_matches_the_reference(method, layout):
    """Every step makes one closure call per micro-batch (plus 2 per probe on finite-difference
    refresh steps) and lands on the oracle (float64 bound above), loss, weights, m and D."""
    model = Separable()
    kw = {**KW, "hessian_method": method, "perturbation": "momentum"}
    groups = _two_groups if layout == "groups" else None
    opt = Sassha(list(model.parameters()) if groups is None else groups(list(model.parameters())), **kw)
    ref_params, ref_losses, ref = reference(1, groups=groups, **kw)
    calls: list[int] = []
    (x,) = batches(1)
    for step in range(STEPS):
        calls.append(0)
        assert opt.one_pass_due()
        if layout == "accumulation":  # two micro-batches of 6 rows, each returning half the loss
            closure = [_counting(lambda part=part: 0.5 * model(part), calls) for part in (x[:6], x[6:])]
        else:
            closure = _counting(lambda: model(x), calls)
        loss = opt.step(closure)
        assert loss.item() == pytest.approx(ref_losses[step], rel=1e-10)
        refreshed = step % KW["lazy_hessian"] == 0
        assert opt.last_report.hessian_refreshed == refreshed
        micro = 2 if layout == "accumulation" else 1
        assert calls[-1] == micro * (1 + (2 if refreshed and method == "finite_difference" else 0))
    for p, q in zip(model.parameters(), ref_params, strict=True):
        torch.testing.assert_close(p.detach(), q, **EXACT_TOL)
    for p, m, d in zip(model.parameters(), ref.m, ref.D, strict=True):
        torch.testing.assert_close(opt.state[p][keys.MOMENTUM], m, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p][keys.HESSIAN_DIAG], d, rtol=1e-10, atol=1e-12)
    assert opt.counters[keys.GLOBAL_STEP] == STEPS


def _authors_loop(steps: int, x: torch.Tensor) -> list[torch.Tensor]:
    """The authors' M-SASSHA step as the issue states it, written out in plain torch: the weights
    hold w~ between steps; restore the saved w; decay; m; D every k steps with the correction
    1 - b2^t frozen at the refresh; the step; then nf from the new m and w~ = w - nf m."""
    model = Separable()
    lr, (b1, b2), wd, rho, k, eps = 0.15, (0.9, 0.999), 1e-2, 0.3, 10, 1e-4
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    d = [torch.zeros_like(p) for p in params]
    nf, correction = 0.0, 1.0
    w = [p.detach().clone() for p in params]  # w~ = w before the first step
    for t in range(1, steps + 1):
        loss = model(x)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        refresh = (t - 1) % k == 0
        if refresh:  # exact Hutchinson at w~, the shared probe stream of sassha_dist (probe 0)
            from sassha_dist.hessian.probes import probe_key, rademacher

            n = (t - 1) // k
            zs = [
                rademacher(probe_key(0, n, i, 0, rank=0), p.numel(), dtype=p.dtype).view_as(p)
                for i, p in enumerate(params)
            ]
            hz = torch.autograd.grad(grads, params, grad_outputs=zs)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(w[i])  # restore the saved w
                p.mul_(1 - lr * wd)
                m[i] = b1 * m[i] + (1 - b1) * grads[i].detach()
                if refresh:
                    d[i] = b2 * d[i] + (1 - b2) * (hz[i] * zs[i]).abs()
            if refresh:
                correction = 1 - b2**t
            for i, p in enumerate(params):
                p.sub_(lr / (1 - b1**t) * m[i] / (d[i] / correction + eps))
            w = [p.detach().clone() for p in params]
            nf = rho / (torch.sqrt(sum((mi**2).sum() for mi in m)) + 1e-12)
            for i, p in enumerate(params):
                p.sub_(nf * m[i])  # w~ for the next step
    return w


def test_authors_recipe_matches_their_loop():
    """``Sassha.authors(params, recipe="momentum")`` against the authors' algorithm transcribed
    above, which perturbs at the end of each step: the same weights (float64 bound)."""
    (x,) = batches(1)
    model = Separable()
    opt = Sassha.authors(model.parameters(), recipe="momentum")
    assert opt.options.perturbation == "momentum" and opt.hessian_method == "exact"
    for _ in range(25):
        opt.step(lambda: model(x))
    for p, q in zip(model.parameters(), _authors_loop(25, x), strict=True):
        torch.testing.assert_close(p.detach(), q, **EXACT_TOL)


def test_unperturbed_and_cancel_hold_the_exact_weights():
    """Between steps the parameters are w (``unperturbed`` does nothing); inside a step it swaps
    w in and puts w~ back bit for bit; ``cancel`` restores w exactly; a backward of the loop's own
    in place of ``gradient_pass`` (which would be at w, not w~) is refused."""
    (x,) = batches(1)
    model = Separable()
    opt = Sassha(model.parameters(), **KW, perturbation="momentum")
    for _ in range(3):
        opt.step(lambda: model(x))
    w = [p.detach().clone() for p in model.parameters()]
    with opt.unperturbed():
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    opt.gradient_pass(lambda: model(x))
    perturbed = [p.detach().clone() for p in model.parameters()]
    assert not any(torch.equal(p, q) for p, q in zip(perturbed, w, strict=True))
    with opt.unperturbed():
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed, strict=True))
    opt.cancel()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    model(x).backward()
    with pytest.raises(RuntimeError, match="gradient_pass"):
        opt.perturb()


def test_resume_through_checkpoint_is_bit_for_bit(tmp_path):
    """``sassha_dist.checkpoint``: a run saved after 4 steps and resumed into a fresh model and
    optimizer ends on the weights, m, D and counters of the uninterrupted run, bit for bit (the
    ascent is derived again from w and m)."""
    from sassha_dist import checkpoint

    data = batches(8)

    def run(model, opt, steps):
        for s in steps:
            opt.step(lambda s=s: model(data[s]))

    kw = {**KW, "perturbation": "momentum"}
    model = Separable()
    opt = Sassha(model.parameters(), **kw)
    run(model, opt, range(8))
    first = Separable()
    first_opt = Sassha(first.parameters(), **kw)
    run(first, first_opt, range(4))
    checkpoint.save_checkpoint(tmp_path, 4, first, first_opt)
    resumed = Separable()
    with torch.no_grad():
        for p in resumed.parameters():
            p.zero_()
    resumed_opt = Sassha(resumed.parameters(), **kw)
    assert checkpoint.load_latest(tmp_path, resumed, resumed_opt)["step"] == 4
    run(resumed, resumed_opt, range(4, 8))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in (keys.MOMENTUM, keys.HESSIAN_DIAG):
            assert torch.equal(opt.state[p][key], resumed_opt.state[q][key])
    assert opt.counters == resumed_opt.counters


@pytest.mark.parametrize("setting", ["adaptive", "local_perturbation"])
def test_unsupported_settings_are_refused(setting):
    with pytest.raises(ValueError, match=f"Invalid {setting}=True with perturbation='momentum'"):
        Sassha(Separable().parameters(), perturbation="momentum", **{setting: True})
    with pytest.raises(ValueError, match="Invalid perturbation='sam'"):
        Sassha(Separable().parameters(), perturbation="sam")


# -- DDP, FSDP2 (W = 2 and 3), FSDP1: real gloo ranks ------------------------------------------

FD = {"hessian_method": "finite_difference", "probe_mode": "global", "n_samples": 2}


def _train(optimizer, loss_of, steps: int = STEPS) -> dict:
    calls: list[int] = []
    closure = _counting(loss_of, calls)
    losses = []
    for _ in range(steps):
        calls.append(0)
        losses.append(optimizer.step(closure).item())
    return {"losses": losses, "calls": calls}


def _fully_shard(world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(Separable(), mesh=init_device_mesh("cpu", (world,)))


def _torch_engines(rank: int, world: int) -> dict[str, dict]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sassha_dist.distributed import FlatShard, FullyShard, Replicated

    x = batches(world)[rank]
    out = {}
    if world == 2:
        inner = Separable()
        ddp = nn.parallel.DistributedDataParallel(inner)
        opt = Sassha(
            ddp.parameters(), **KW, hessian_method="exact", probe_mode="per_rank", perturbation="momentum"
        )
        assert isinstance(opt.strategy, Replicated)
        out["ddp"] = _train(opt, lambda: ddp(x))
        out["ddp"]["params"] = [p.detach().clone() for p in inner.parameters()]

        fsdp1 = FullyShardedDataParallel(Separable(), device_id=torch.device("cpu"), use_orig_params=True)
        opt = Sassha(fsdp1.parameters(), strategy=FlatShard(fsdp1), **KW, **FD, perturbation="momentum")
        out["fsdp1"] = _train(opt, lambda: fsdp1(x))
        with FullyShardedDataParallel.summon_full_params(fsdp1):
            out["fsdp1"]["params"] = [p.detach().clone() for p in fsdp1.parameters()]

        exact = _fully_shard(world)
        strategy = FullyShard(exact.parameters(), module=exact)
        opt = Sassha(
            exact.parameters(), strategy=strategy, **KW, hessian_method="exact", perturbation="momentum"
        )
        out["fsdp2_exact"] = _train(opt, lambda: exact(x))
        out["fsdp2_exact"]["params"] = [p.full_tensor().detach().clone() for p in exact.parameters()]

    fsdp2 = _fully_shard(world)
    opt = Sassha(fsdp2.parameters(), **KW, **FD, perturbation="momentum")
    assert isinstance(opt.strategy, FullyShard)
    out["fsdp2"] = _train(opt, lambda: fsdp2(x))
    out["fsdp2"]["params"] = [p.full_tensor().detach().clone() for p in fsdp2.parameters()]
    return out


_LAUNCHES: dict[object, list] = {}


def _results(world: int, engine: str) -> list[dict]:
    if world not in _LAUNCHES:
        _LAUNCHES[world] = run_ranks(_torch_engines, world, timeout=240)
    return [per_rank[engine] for per_rank in _LAUNCHES[world]]


def _assert_like(results: list[dict], world: int, rtol: float, atol: float, method: str, **config) -> None:
    ref_params, ref_losses, _ = reference(
        world, **KW, **config, hessian_method=method, perturbation="momentum"
    )
    fd_passes = 2 * config.get("n_samples", 1) if method == "finite_difference" else 0
    expected = [1 + (fd_passes if t % KW["lazy_hessian"] == 0 else 0) for t in range(STEPS)]
    for result in results:
        assert result["calls"] == expected
        for actual, wanted in zip(result["params"], ref_params, strict=True):
            torch.testing.assert_close(actual, wanted, rtol=rtol, atol=atol)
    mean = [sum(r["losses"][t] for r in results) / world for t in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(ref_losses), rtol=rtol, atol=0)


def test_ddp_exact():
    """DDP with per-rank probes: one closure call per step, the exact products fused into it and
    averaged in one all-reduce; the oracle's W = 2 emulation to ``rtol=1e-10``."""
    _assert_like(_results(2, "ddp"), 2, 1e-10, 1e-12, "exact", probe_mode="per_rank")


@pytest.mark.parametrize(
    ("world", "engine", "method"),
    [
        (2, "fsdp2", "finite_difference"),
        (3, "fsdp2", "finite_difference"),
        (2, "fsdp1", "finite_difference"),
        (2, "fsdp2_exact", "exact"),
    ],
)
def test_sharded(world, engine, method):
    """FSDP2 (W = 2, and W = 3 with an empty shard) and FSDP1 with central differences and global
    probes: 1 + 4 calls on refresh steps (n_samples 2), 1 otherwise; FSDP2 with exact Hessians
    (``FullyShard(module=...)``): 1 call per step; the oracle to ``rtol=1e-9``."""
    config = (
        {k: v for k, v in FD.items() if k != "hessian_method"}
        if method != "exact"
        else {"probe_mode": "global"}
    )
    _assert_like(_results(world, engine), world, 1e-9, 1e-12, method, **config)


# -- DeepSpeed ZeRO 1/2/3 ----------------------------------------------------------------------


def _zero_stages(rank: int, world: int) -> dict[int, dict]:
    from sassha_dist.distributed.deepspeed import initialize
    from tests import test_deepspeed as zero

    zero._init(rank)
    x = batches(world, dtype=torch.float32)[rank]
    out = {}
    for stage in zero.STAGES:
        model = Separable(torch.float32)
        config = zero._config(stage)
        engine, sassha = initialize(model, config, **KW, **FD, fd_step=1e-2, perturbation="momentum")
        calls: list[int] = []
        closure = _counting(lambda engine=engine: engine(x), calls)
        losses = []
        for _ in range(STEPS):
            calls.append(0)
            losses.append(sassha.step(closure).item())
        out[stage] = {
            "params": zero._full_params(model),
            "losses": losses,
            "calls": calls,
            "counters": dict(sassha.optimizer.counters),
        }
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero(stage):
    """The ZeRO driver, fp32: the ascent on the fp32 partitions, pushed to the model's copy, then
    the difference passes at w~ on refresh steps and the one pass, whose gradient DeepSpeed keeps
    for its step; against the oracle at tests/test_deepspeed.py's fp32 tolerance."""
    from tests import test_deepspeed as zero  # skips without deepspeed; sets DS_ACCELERATOR=cpu

    if "zero" not in _LAUNCHES:
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()
        _LAUNCHES["zero"] = run_ranks(_zero_stages, 2, timeout=300)
    results = [per_rank[stage] for per_rank in _LAUNCHES["zero"]]
    config = {k: v for k, v in FD.items() if k != "hessian_method"}
    ref_params, ref_losses, ref = reference(
        2, **KW, **config, hessian_method="finite_difference", fd_step=1e-2, perturbation="momentum"
    )
    expected = [1 + (4 if t % KW["lazy_hessian"] == 0 else 0) for t in range(STEPS)]
    for result in results:
        assert result["calls"] == expected
        for actual, wanted in zip(result["params"], ref_params, strict=True):
            torch.testing.assert_close(actual.double(), wanted, rtol=zero.RTOL, atol=zero.ATOL)
        assert result["counters"] == {
            keys.GLOBAL_STEP: STEPS,
            keys.HESSIAN_REFRESHES: ref.hessian_refreshes,
            keys.SKIPPED_STEPS: 0,
        }
    mean = [sum(r["losses"][t] for r in results) / 2 for t in range(STEPS)]
    torch.testing.assert_close(
        torch.tensor(mean, dtype=torch.float64),
        torch.tensor(ref_losses, dtype=torch.float64),
        rtol=zero.RTOL,
        atol=0,
    )


# -- the Trainer -------------------------------------------------------------------------------

BLOCK, BATCH, ACCUM, TRAINER_STEPS, LR = 16, 2, 2, 4, 0.05
TRAINER_ARGS = "perturbation=momentum,rho=0.3,hessian_method=exact,lazy_hessian=2"


def _gpt2() -> nn.Module:
    from sassha_dist.integrations.embedded import tiny_gpt2

    return tiny_gpt2(seed=0, n_positions=BLOCK).double()


def _blocks(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, BLOCK), generator=torch.Generator().manual_seed(0))


def _trainer(model, out, blocks, callbacks=(), **settings):
    from sassha_dist.integrations.embedded import BlockDataset
    from sassha_dist.integrations.transformers import SasshaTrainer
    from tests.helpers import trainer_arguments

    args = trainer_arguments(
        out,
        **{
            "optim_args": TRAINER_ARGS,
            "learning_rate": LR,
            "weight_decay": 0.1,
            "lr_scheduler_type": "constant",
            "max_steps": TRAINER_STEPS,
            "per_device_train_batch_size": BATCH,
            "per_device_eval_batch_size": BATCH,
            "gradient_accumulation_steps": ACCUM,
            "max_grad_norm": 0.0,
            **settings,
        },
    )
    dataset = BlockDataset(blocks)
    return SasshaTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, callbacks=list(callbacks)
    )


def test_trainer_one_forward_per_micro_batch_and_the_plain_loop(tmp_path):
    """``--optim_args perturbation=momentum``: one forward per micro-batch (no replay), the
    weights of a plain ``Sassha.step(closures)`` loop in the Trainer's groups (float64; the
    bounds of tests/test_transformers_integration.py, ``rtol=1e-9, atol=1e-10``), and
    ``evaluate()`` sees w: its loss is the plain model's at w."""
    from transformers import TrainerCallback

    blocks = _blocks(BATCH * ACCUM * TRAINER_STEPS)
    model = _gpt2()
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    per_step: list[int] = []

    class PerStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            per_step.append(forwards[0] - sum(per_step))

    trainer = _trainer(model, tmp_path / "out", blocks, callbacks=[PerStep()])
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert optimizer.options.perturbation == "momentum" and not optimizer.in_step
    assert per_step == [ACCUM] * TRAINER_STEPS

    plain = _gpt2()
    plain.train()
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = dict(plain.named_parameters())
    groups = [
        {"params": [by_name[names[id(p)]] for p in group["params"]], "weight_decay": group["weight_decay"]}
        for group in optimizer.param_groups
    ]
    reference = Sassha(
        groups, lr=LR, rho=0.3, hessian_method="exact", lazy_hessian=2, perturbation="momentum"
    )
    for step in range(TRAINER_STEPS):
        window = blocks[step * BATCH * ACCUM : (step + 1) * BATCH * ACCUM].split(BATCH)
        reference.step([lambda b=b: plain(input_ids=b, labels=b).loss / ACCUM for b in window])
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), by_name[name].detach(), rtol=1e-9, atol=1e-10, msg=name)

    metrics = trainer.evaluate()
    plain.eval()
    with torch.no_grad():
        at_w = [plain(input_ids=b, labels=b).loss for b in blocks.split(BATCH)]
    assert metrics["eval_loss"] == pytest.approx(float(torch.stack(at_w).mean()), rel=1e-9)


def test_trainer_resume_is_bit_for_bit(tmp_path):
    """A run saved at step 2 and resumed from the Trainer's checkpoint ends on the uninterrupted
    run's weights and counters, bit for bit; the saved model is w, not w~."""
    from transformers import AutoModelForCausalLM

    blocks = _blocks(BATCH * ACCUM * TRAINER_STEPS)
    saving = {"save_strategy": "steps", "save_steps": 2}
    full = _gpt2()
    trainer = _trainer(full, tmp_path / "a", blocks, **saving)
    trainer.train()
    counters = dict(trainer.optimizer.optimizer.counters)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / f"checkpoint-{TRAINER_STEPS}")
    for (name, a), b in zip(full.named_parameters(), saved.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach().to(a.dtype)), name

    resumed = _gpt2()
    trainer = _trainer(resumed, tmp_path / "b", blocks, **saving)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.optimizer.optimizer.counters == counters
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
