"""Dropout on (``model.train()``): finite-difference Hessians against exact ones under the same masks.

A finite-difference Hessian-vector product ``(g(w + hz) - g(w - hz)) / 2h`` differences two
gradients taken in two forward passes. With dropout every pass draws a new mask, so without
``replay_rng`` the difference is mask noise divided by ``2h``: measured here 45-370 times the
estimate's own size (SPEC §2: 147x). ``Sassha(..., replay_rng=True)`` (the default) replays the
random-number state of a step's first pass in every later one, so the finite difference sees one
function, whose Hessian the exact method (double backward) takes with the same masks.

The tolerance. ``FD_TOL = 3e-4`` is the fp32 bound the dropout-free tests already use for the
central difference at the default ``h0 = 1e-3`` against the fp32 exact product
(tests/test_hessian.py, ``test_finite_difference_fp32_central_and_forward``: measured 6.5e-5, the
bound ~4x that; tests/test_fsdp2_mixed_precision.py, fp32 under FSDP2: measured 6.8e-5). With the
masks replayed, dropout costs no accuracy: measured 3.3e-5 to 6e-5 here, as without dropout
(central; forward differences 9e-4, under their own dropout-free bound ``FD_FORWARD_TOL``; see each
test). Without replay the same comparisons are off by 45x to 370x the estimate itself, so every
test also checks that ``replay_rng=False`` fails by far more than the tolerance
(``REPLAY_OFF_MIN``, 3000x it): the tests would fail without the fix.

How the masks match across runs. Masks come from the global CPU generator. A single-device run is
seeded (``torch.manual_seed``) just before its step, so the finite-difference and the exact run draw
the same masks in their first pass, and replay keeps them for the step's later passes. On W ranks,
rank r seeds ``MASK_SEED + r`` before its step of ``MICRO`` micro-batches; the single-process exact
reference evaluates each (rank, micro-batch) in a closure that sets the generator to the state that
rank records for that micro-batch (``_rank_closures``), so its every pass draws that rank's masks,
and returns ``loss / (W * MICRO)``: the mean loss that DDP, FSDP2 and ZeRO average gradients of.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sassha_dist import Sassha
from sassha_dist import state_keys as keys
from tests.distributed import run_ranks

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed (the ZeRO-2 run) on the CPU, its one JIT op compiled once per checkout (gitignored).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))

FD_TOL = 3e-4  # fp32, central, h0 = 1e-3: the dropout-free bound (module docstring)
# fp32, forward, h0 = 1e-3 (one extra pass, reusing the perturbed gradient): the dropout-free bound
# of the same test in tests/test_hessian.py (measured there 5.8e-3)
FD_FORWARD_TOL = 2.5e-2
REPLAY_OFF_MIN = 1.0  # without replay: the error exceeds the estimate itself (> 3000x FD_TOL)
P = 0.2
MASK_SEED = 100
WORLD = 2
MICRO = 2  # micro-batches per rank and step (gradient accumulation) in the W-rank runs
ROWS = 32
KW = {"lr": 0.05, "rho": 0.05, "probe_mode": "global"}  # global probes: one z, whatever the engine

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(hidden: int = 16, seed: int = 0) -> nn.Module:
    """Two hidden layers with dropout P; rows 16, 16 and 1 (an empty shard at W=2 under FSDP2)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(8, hidden), nn.Tanh(), nn.Dropout(P), nn.Linear(hidden, hidden), nn.Tanh()]
    return nn.Sequential(*layers, nn.Dropout(P), nn.Linear(hidden, 1))


def _batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + index)
    return torch.randn(ROWS, 8, generator=g), torch.randn(ROWS, 1, generator=g)


def _mse(model, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _relative_error(actual, expected) -> float:
    a = torch.cat([t.reshape(-1).double() for t in actual])
    e = torch.cat([t.reshape(-1).double() for t in expected])
    return float((a - e).norm() / e.norm())


# ------------------------------------------------------------------------------ single device


def _tiny_gpt2() -> nn.Module:
    from sassha_dist.integrations.embedded import tiny_gpt2

    return tiny_gpt2(seed=0, n_positions=16, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def _blocks(count: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (count, 16), generator=torch.Generator().manual_seed(0))


def _lm_loss(model) -> torch.Tensor:
    blocks = _blocks()
    return model(input_ids=blocks, labels=blocks).loss


MODELS = {
    # dropout 0.2 after both hidden layers
    "mlp": (_mlp, lambda model: _mse(model, _batch(0))),
    # GPT-2's own dropout sites (embeddings, attention weights, residual branches) at 0.1
    "tiny-gpt2": (_tiny_gpt2, _lm_loss),
}


def _pending_estimate(
    name: str, method: str, replay: bool, seed: int, fd_scheme: str = "central"
) -> list[torch.Tensor]:
    """One Hessian step's Hutchinson estimate z * (Hz) at theta + eps (probe ``seed``), read between
    the passes; masks seeded by ``seed`` as well."""
    make, loss_of = MODELS[name]
    model = make()
    model.train()
    optimizer = Sassha(
        model.parameters(), hessian_method=method, fd_scheme=fd_scheme, replay_rng=replay, seed=seed, **KW
    )
    torch.manual_seed(MASK_SEED + seed)
    closure = lambda: loss_of(model)  # noqa: E731
    optimizer.perturb(optimizer.gradient_pass(closure))
    optimizer.perturbed_pass(closure)  # the exact estimate
    optimizer.hessian_pass(closure)  # the finite-difference estimate
    estimates = [e.detach().clone() for e in optimizer.current_step.estimates]
    optimizer.cancel()
    return estimates


@pytest.mark.parametrize(
    ("name", "fd_scheme", "bound"),
    [("mlp", "central", FD_TOL), ("tiny-gpt2", "central", FD_TOL), ("mlp", "forward", FD_FORWARD_TOL)],
)
def test_finite_difference_matches_exact_with_dropout(name, fd_scheme, bound):
    """Mean over 5 probes (and mask draws) of ||fd - exact|| / ||exact||, as tests/test_hessian.py.

    Measured, replay on: central mlp 5.9e-5, tiny GPT-2 5.2e-5 (the same models without dropout:
    5.4e-5 and 5.3e-5), forward mlp 9.1e-4; replay off: 202, 47 and 368.
    """
    seeds = range(5)
    errors = {
        replay: sum(
            _relative_error(
                _pending_estimate(name, "finite_difference", replay, s, fd_scheme),
                _pending_estimate(name, "exact", replay, s),
            )
            for s in seeds
        )
        / len(seeds)
        for replay in (True, False)
    }
    print(f"\n{name} {fd_scheme}: FD vs exact, replay on {errors[True]:.2e}, off {errors[False]:.3g}")
    assert errors[True] < bound
    assert errors[False] > REPLAY_OFF_MIN


def test_dropout_is_on():
    """The models above draw new masks per forward pass (else the tests above would prove nothing)."""
    for make, loss_of in MODELS.values():
        model = make()
        model.train()
        with torch.no_grad():
            assert float(loss_of(model)) != float(loss_of(model))


# ------------------------------------------------------------------------------ W ranks


def _micro_batch(rank: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _batch(MICRO * rank + k)


def _rank_closures(model, world: int, mask_seed: int) -> list:
    """The reference's closures, one per (rank r, micro-batch k), each returning loss / (W * MICRO).

    Every pass of closure (r, k) draws the masks rank r draws for micro-batch k: the generator as
    rank r seeded it, advanced by one forward pass over r's earlier micro-batches (replay records
    micro-batch k's state where micro-batch k - 1's first pass leaves the generator)."""

    def closure(r: int, k: int) -> torch.Tensor:
        torch.manual_seed(mask_seed + r)
        with torch.no_grad():
            for j in range(k):
                model(_micro_batch(r, j)[0])
        return _mse(model, _micro_batch(r, k)) / (world * MICRO)

    return [lambda r=r, k=k: closure(r, k) for r in range(world) for k in range(MICRO)]


def _reference_hessian_diag(world: int, mask_seed: int = MASK_SEED) -> list[torch.Tensor]:
    """D after one exact Hessian step (global probe, seed 0) of the mean loss over the ranks' masks."""
    model = _mlp()
    model.train()
    optimizer = Sassha(model.parameters(), hessian_method="exact", **KW)
    optimizer.step(_rank_closures(model, world, mask_seed))
    assert optimizer.last_report.hessian_refreshed
    return [optimizer.state[p][keys.HESSIAN_DIAG].detach().clone() for p in model.parameters()]


def _one_pass_rng_state(rank: int) -> torch.Tensor:
    """The CPU generator after rank ``rank``'s seed and one forward pass (of a plain twin) over its
    micro-batches."""
    twin = _mlp().train()  # (seeds the generator with the initial weights: first)
    torch.manual_seed(MASK_SEED + rank)
    with torch.no_grad():
        for k in range(MICRO):
            _mse(twin, _micro_batch(rank, k))
    return torch.get_rng_state()


def _micro_closures(model, rank: int, scale: float) -> list:
    return [lambda k=k: _mse(model, _micro_batch(rank, k)) * scale for k in range(MICRO)]


def _result(optimizer, tensors, rank: int) -> dict:
    """This rank's D (``_hessian_pieces``), and whether the step left the generator where one pass does."""
    after_step = torch.get_rng_state()
    return {
        "pieces": _hessian_pieces(optimizer, tensors),
        "one_pass_rng": torch.equal(after_step, _one_pass_rng_state(rank)),
    }


def _hessian_pieces(optimizer, tensors) -> list[tuple[int, int, torch.Tensor]]:
    """This rank's part of D as ``(parameter ordinal, element offset, values)``, from the probe segments
    (which place each local element in the full parameter), ZeRO's padding excluded."""
    pieces = []
    for index, t in enumerate(tensors):
        d = optimizer.strategy.local(optimizer.state[t][keys.HESSIAN_DIAG]).reshape(-1)
        for seg in optimizer.strategy.probe_segments(t, index):
            values = d[seg.local_start : seg.local_start + seg.length].detach().clone()
            pieces.append((seg.param_index, seg.element_offset, values))
    return pieces


def _fsdp2(rank: int, world: int, replay: bool):
    from tests.sharded import fully_sharded

    model = fully_sharded(_mlp(), world)
    model.train()
    optimizer = Sassha(model.parameters(), hessian_method="finite_difference", replay_rng=replay, **KW)
    torch.manual_seed(MASK_SEED + rank)
    optimizer.step(_micro_closures(model, rank, 1 / MICRO))
    return _result(optimizer, list(model.parameters()), rank)


def _ddp(rank: int, world: int, replay: bool):
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.train()
    optimizer = Sassha(ddp.parameters(), hessian_method="finite_difference", replay_rng=replay, **KW)
    torch.manual_seed(MASK_SEED + rank)
    optimizer.step(_micro_closures(ddp, rank, 1 / MICRO))
    return _result(optimizer, list(ddp.parameters()), rank)


def _zero2(rank: int, world: int, replay: bool):
    import deepspeed

    from sassha_dist.distributed.deepspeed import initialize

    os.environ["LOCAL_RANK"] = str(rank)
    deepspeed.init_distributed(dist_backend="gloo")
    model = _mlp()
    config = {
        "train_micro_batch_size_per_gpu": ROWS,
        "gradient_accumulation_steps": MICRO,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 2},
    }
    engine, sassha = initialize(model, config, hessian_method="finite_difference", replay_rng=replay, **KW)
    engine.train()
    torch.manual_seed(MASK_SEED + rank)
    sassha.step(_micro_closures(engine, rank, 1.0))  # DeepSpeed divides by the accumulation steps
    return _result(sassha.optimizer, list(sassha.adapter.flats), rank)


ENGINES = {"fsdp2": _fsdp2, "ddp": _ddp, "zero2": _zero2}


def _all_engines(rank: int, world: int, engines: list[str]) -> dict:
    """Every engine's one-step D, with and without replay, in one launch (a launch costs ~5 s)."""
    out = {}
    for engine in engines:
        for replay in (True, False):
            out[engine, replay] = ENGINES[engine](rank, world, replay)
            dist.barrier()
    return out


_LAUNCH: dict[str, list[dict]] = {}


def _engine_results() -> list[dict]:
    if "results" not in _LAUNCH:
        engines = ["fsdp2", "ddp"]
        if importlib.util.find_spec("deepspeed") is not None:
            # Compile DeepSpeed's JIT op in this process first, so that the ranks only load it.
            from deepspeed.comm.torch import build_shm_op

            build_shm_op()
            engines.append("zero2")
        _LAUNCH["results"] = run_ranks(_all_engines, WORLD, engines, timeout=240)
    return _LAUNCH["results"]


def _assemble(results: list[dict], key, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """The full D from every rank's pieces; each element must be covered (replicas agree)."""
    full = [torch.full((t.numel(),), float("nan")) for t in like]
    for result in results:
        for index, offset, values in result[key]["pieces"]:
            part = full[index][offset : offset + values.numel()]
            known = ~part.isnan()
            assert torch.equal(part[known], values[known]), "ranks disagree on a replicated element"
            part.copy_(values)
    assert not any(bool(f.isnan().any()) for f in full), "some element of D is on no rank"
    return [f.view_as(t) for f, t in zip(full, like, strict=True)]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_finite_difference_matches_exact_with_dropout(engine):
    """FSDP2 (W=2, fully_shard per Linear and the root; the last layer's one row leaves an empty
    shard), DDP (W=2) and DeepSpeed ZeRO-2 (W=2, fp32, gradient_accumulation_steps=2): D = (1 - beta2)
    |z * (Hz)| after one finite-difference step with global probes, each rank on its own 2
    micro-batches (a list of closures; DeepSpeed's accumulation) with its own masks, against the
    single-process exact step on the same micro-batches and masks (module docstring).
    ``||D_fd - D_exact|| / ||D_exact||`` is at most the estimates' relative error
    (``| |a| - |b| | <= |a - b|``), so the dropout-free bound holds for it. Measured, replay on:
    FSDP2 3.3e-5, DDP 3.3e-5, ZeRO-2 3.3e-5; replay off: 134, 134, 110. (ZeRO-1 and ZeRO-3, and
    FSDP1, measured the same way once: 2.9e-5 to 3.2e-5 with replay.) The reference itself tells
    masks apart: with other masks its D moves by 0.34-0.37 relative, so agreement to FD_TOL means
    the engines' passes drew exactly the reference's masks, on every rank and micro-batch. With
    replay each rank's step (4 passes per micro-batch) leaves the generator where one forward pass
    over its micro-batches does, as on a single device."""
    if engine == "zero2":
        pytest.importorskip("deepspeed")
    results = _engine_results()
    expected = _reference_hessian_diag(WORLD)
    assert _relative_error(_reference_hessian_diag(WORLD, MASK_SEED + WORLD), expected) > 0.1
    errors = {
        replay: _relative_error(_assemble(results, (engine, replay), expected), expected)
        for replay in (True, False)
    }
    print(f"\n{engine}: D, FD vs exact with dropout: replay on {errors[True]:.2e}, off {errors[False]:.3g}")
    assert errors[True] < FD_TOL
    assert errors[False] > REPLAY_OFF_MIN
    assert [r[engine, True]["one_pass_rng"] for r in results] == [True] * WORLD
    assert [r[engine, False]["one_pass_rng"] for r in results] == [False] * WORLD


# ------------------------------------------------------------------------------ training


def _teacher_batches(count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable target (a linear teacher) for the dropout MLP, 64 rows per batch."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 1, generator=g)
    xs = [torch.randn(64, 8, generator=g) for _ in range(count)]
    return [(x, x @ w / 3 + 0.5) for x in xs]


def _train(init_seed: int, method: str, replay: bool, steps: int = 30) -> tuple[list[float], float, float]:
    """``steps`` steps (a Hessian refresh every 2) of the dropout MLP in train mode; returns the
    training losses, the final loss in eval mode (no dropout) over all batches, and mean(D)."""
    model = _mlp(hidden=32, seed=init_seed)
    model.train()
    optimizer = Sassha(model.parameters(), lazy_hessian=2, hessian_method=method, replay_rng=replay, **KW)
    batches = _teacher_batches()
    torch.manual_seed(MASK_SEED)
    losses = []
    for t in range(steps):
        batch = batches[t % len(batches)]
        losses.append(optimizer.step(lambda batch=batch: _mse(model, batch)).item())
    assert optimizer.skipped_steps == 0
    model.eval()
    with torch.no_grad():
        final = sum(float(_mse(model, b)) for b in batches) / len(batches)
    return losses, final, optimizer.hessian_stats()["hessian_mean"]


@pytest.mark.parametrize("init_seed", [3, 4, 5])
def test_training_with_dropout_tracks_the_exact_method(init_seed):
    """30 steps, a Hessian refresh every 2, of a 8-32-32-1 MLP with dropout 0.2 on a linear teacher.

    With replay both methods draw the same masks on every step (after a step the generator stands
    where one pass leaves it, whatever the number of passes: test below), so the runs differ only
    by each refresh's finite-difference error (~6e-5 relative in D), carried forward by the
    preconditioned steps. Measured over initial seeds 3-12 (the losses fall from 1.4-1.8 to
    0.03-0.05 in eval mode): training losses within 4e-5 to 1.9e-2 relative of the exact run's
    step by step (seeds 3-5: at most 1.9e-3), final eval losses within 7.3e-3 relative, final
    mean(D) within 1.2e-3. Bounds: 5e-2, 2e-2 and 1e-2.

    Without replay every pass draws new masks: harmless for the exact method (its Hessian comes
    from one graph; final losses 0.83-1.20x the replayed run's; bound 0.5-2x), fatal for finite
    differences: D comes out 140-190x too large, the steps ~12x too short, and the eval loss stays
    at 0.62-0.78 of the initial loss, 21-36x the exact run's. Bounds: D > 10x, final loss > 5x the
    exact run's and > 0.3x the initial loss."""
    exact_losses, exact_final, exact_d = _train(init_seed, "exact", True)
    fd_losses, fd_final, fd_d = _train(init_seed, "finite_difference", True)
    _, no_replay_exact_final, _ = _train(init_seed, "exact", False)
    _, no_replay_fd_final, no_replay_fd_d = _train(init_seed, "finite_difference", False)
    gap = max(abs(a - b) / b for a, b in zip(fd_losses, exact_losses, strict=True))
    print(
        f"\nseed {init_seed}: loss {exact_losses[0]:.3f} -> eval exact {exact_final:.4f}, fd {fd_final:.4f} "
        f"(max step gap {gap:.1e}); no replay: exact {no_replay_exact_final:.4f}, "
        f"fd {no_replay_fd_final:.4f}; mean D exact {exact_d:.2e}, fd {fd_d:.2e}, "
        f"fd no replay {no_replay_fd_d:.2e}"
    )
    assert exact_final < 0.1 * exact_losses[0]  # the run learns
    assert gap < 5e-2
    assert abs(fd_final - exact_final) < 2e-2 * exact_final
    assert abs(fd_d - exact_d) < 1e-2 * exact_d
    assert 0.5 * exact_final < no_replay_exact_final < 2 * exact_final
    assert no_replay_fd_d > 10 * exact_d
    assert no_replay_fd_final > 5 * exact_final
    assert no_replay_fd_final > 0.3 * exact_losses[0]


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_generator_after_a_step_is_where_one_pass_leaves_it(method):
    """With replay, a step (2 micro-batches: 4 passes in all exact, 8 with central differences) leaves
    the CPU generator exactly where one forward pass over the micro-batches does, so the masks (and
    anything else drawn) of later steps do not depend on the Hessian method or the pass count;
    without replay the finite-difference step draws more."""
    model = _mlp()
    model.train()
    closures = [lambda r=r: _mse(model, _batch(r)) / 2 for r in range(2)]
    torch.manual_seed(MASK_SEED)
    with torch.no_grad():
        for closure in closures:
            closure()
    one_pass = torch.get_rng_state()
    for replay in (True, False):
        optimizer = Sassha(model.parameters(), hessian_method=method, replay_rng=replay, **KW)
        torch.manual_seed(MASK_SEED)
        optimizer.step(closures)
        assert optimizer.last_report.hessian_refreshed
        assert torch.equal(torch.get_rng_state(), one_pass) == replay


# ------------------------------------------------------------------------------ the Trainer


def _trainer_hessian_means(tmp_path, optim_args: str) -> tuple[list[float], list[float]]:
    """SasshaTrainer on the dropout tiny GPT-2 (fp32): 3 steps of 2 micro-batches, a refresh on every
    step; the logged ``sassha/hessian_mean`` (mean of D) and losses per step."""
    from sassha_dist.integrations.embedded import BlockDataset
    from sassha_dist.integrations.transformers import SasshaTrainer
    from tests.helpers import trainer_arguments

    blocks = torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(0))
    args = trainer_arguments(
        tmp_path / optim_args.replace(",", "_").replace("=", "-"),
        optim_args=f"rho=0.05,lazy_hessian=1,probe_mode=global,{optim_args}",
        learning_rate=0.05,
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,
    )
    trainer = SasshaTrainer(model=_tiny_gpt2(), args=args, train_dataset=BlockDataset(blocks))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["sassha/hessian_refreshes"] for h in logs] == [1.0, 2.0, 3.0]  # a refresh per step
    return [h["sassha/hessian_mean"] for h in logs], [h["loss"] for h in logs]


def test_trainer_finite_difference_tracks_exact_with_dropout(tmp_path):
    """The Trainer's stock ``compute_loss`` closures (tiny GPT-2 in train mode, dropout 0.1, two
    micro-batches per step, each replayed from its own recorded state). The Trainer seeds (seed 0)
    and draws the same samples in every run, so all runs draw the same masks in step 1's first pass
    (the same logged loss, rounded to 4 digits by the Trainer); with replay the exact and the
    finite-difference runs keep drawing the same masks later (each step leaves the generator where
    one pass would). Step 1's mean(D) is one refresh from zero, the mean of (1 - beta2) |z * (Hz)|:
    within FD_TOL of the exact run's (measured 3.2e-5). Steps 2-3 add the trajectories' drift
    (measured 5.8e-4 and 4.0e-4; up to 2.5e-3 without accumulation): bound 1e-2. Without replay
    the finite-difference mean(D) is 46-51x the exact one: bound 10x."""
    exact, exact_losses = _trainer_hessian_means(tmp_path, "hessian_method=exact")
    fd, fd_losses = _trainer_hessian_means(tmp_path, "hessian_method=finite_difference")
    off, off_losses = _trainer_hessian_means(tmp_path, "hessian_method=finite_difference,replay_rng=false")
    gaps = [abs(a - b) / b for a, b in zip(fd, exact, strict=True)]
    print(f"\nTrainer mean(D): exact {exact}, fd {fd} (gaps {gaps}), fd without replay {off}")
    assert exact_losses[0] == fd_losses[0] == off_losses[0]
    assert gaps[0] < FD_TOL
    assert max(gaps) < 1e-2
    assert all(o > 10 * e for o, e in zip(off, exact, strict=True))
