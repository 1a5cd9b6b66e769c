"""Smoke tests of ``python -m sassha_dist.bench``: each subcommand at a tiny size; cost-model sanity.

No timing assertions: the machine is shared and noisy. Each subcommand must
run, print its ratios, and return finite numbers.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from sassha_dist.bench import cost_model
from sassha_dist.bench.__main__ import main
from sassha_dist.bench.models import SamAdamW, train_step
from sassha_dist.bench.quality import Grid, hessian_max_eigenvalue, tune

pytestmark = pytest.mark.usefixtures("one_thread")


def _finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_step_time_smoke(capsys):
    result = main(
        [
            "step-time",
            "--rounds",
            "1",
            "--k",
            "1",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "x AdamW" in out and "x floor" in out and "c_exact" in out and "c_fd" in out
    names = [r["name"] for r in result["rows"]]
    assert names == [
        "AdamW",
        "SAM-AdamW",
        "SASSHA exact k=1",
        "SASSHA exact k=2",
        "SASSHA FD central k=1",
        "SASSHA FD central k=2",
        "SASSHA ρ=0 exact k=2",
        "SASSHA ρ=0 FD central k=2",
        "M-SASSHA exact k=2",
        "M-SASSHA FD central k=2",
    ]
    for row in result["rows"]:
        assert _finite_positive(row["vs_adamw"]) and _finite_positive(row["vs_floor"])
    floors = {r["name"]: r["floor_passes"] for r in result["rows"]}
    assert floors["AdamW"] == 1 and floors["SAM-AdamW"] == 2
    assert floors["SASSHA FD central k=1"] > floors["SASSHA FD central k=2"] > 2
    # rho = 0: one pass per step, 1 + c/k (c of the same method, the same k as the two-pass row)
    for label in ("exact", "FD central"):
        assert floors[f"SASSHA ρ=0 {label} k=2"] == pytest.approx(floors[f"SASSHA {label} k=2"] - 1)
        # M-SASSHA: the same one-pass floor as rho = 0 (the ascent reuses the momentum, no extra pass)
        assert floors[f"M-SASSHA {label} k=2"] == pytest.approx(floors[f"SASSHA ρ=0 {label} k=2"])
    assert not any(result["skipped_steps"].values())


def test_step_time_rejects_exact_under_sdpa():
    with pytest.raises(ValueError, match="double backward"):
        main(["step-time", "--attn", "sdpa", "--rounds", "1"])


def test_kernel_smoke(capsys):
    result = main(["kernel", "--numel", "20000", "--rounds", "1", "--steps-per-round", "1"])
    out = capsys.readouterr().out
    assert "x AdamW foreach" in out and "GB/s" in out and "target" in out
    names = {r["name"] for r in result["rows"]}
    assert {"SASSHA foreach", "SASSHA for-loop", "AdamW foreach", "AdamW for-loop"} <= names
    assert result["n_tensors"] == 148
    for row in result["rows"]:
        assert _finite_positive(row["vs_adamw_foreach"]) and _finite_positive(row["gb_per_s"])


def test_kernel_shapes_are_gpt2_small():
    from sassha_dist.bench.kernel import gpt2_small_shapes
    from sassha_dist.bench.models import build_lm

    shapes = gpt2_small_shapes(n_layer=2, n_embd=64, vocab=258, n_positions=128)
    model = build_lm("tiny")
    assert shapes == [tuple(p.shape) for p in model.parameters()]


def test_cost_model_cli(capsys):
    result = main(["cost-model", "--models", "1B", "7B", "--world-sizes", "8", "64"])
    out = capsys.readouterr().out
    assert "SASSHA / AdamW" in out and "FSDP2" in out and "ZeRO-3" in out
    assert len(result["rows"]) == 2 * 2 * len(cost_model.ENGINES)
    assert all(_finite_positive(r["ratio"]) for r in result["rows"])


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_cost_model_state_is_sharded(engine):
    n = 7e9
    one = cost_model.estimate(n, 1, engine, "sassha")
    for w in (2, 8, 64):
        est = cost_model.estimate(n, w, engine, "sassha")
        assert est.state_bytes == pytest.approx(one.state_bytes / w)
        assert est.param_bytes == pytest.approx(one.param_bytes / w)
        assert est.grad_bytes == pytest.approx(one.grad_bytes / w)


@pytest.mark.parametrize("engine", cost_model.ENGINES)
def test_cost_model_adamw_and_sassha_state_equal(engine):
    for w in (1, 8, 512):
        adamw = cost_model.estimate(1e9, w, engine, "adamw")
        sassha = cost_model.estimate(1e9, w, engine, "sassha")
        assert adamw.state_bytes == sassha.state_bytes  # (m, v) vs (m, D), fp32
        assert adamw.param_bytes == sassha.param_bytes and adamw.grad_bytes == sassha.grad_bytes
        assert sassha.peak_bytes > adamw.peak_bytes  # transient buffers
        assert sassha.comm_bytes_per_step > adamw.comm_bytes_per_step or w == 1


@pytest.mark.parametrize("engine", cost_model.ENGINES)
@pytest.mark.parametrize("optimizer", cost_model.OPTIMIZERS)
def test_cost_model_monotonic_in_world_size(engine, optimizer):
    shape = cost_model.MODELS["7B"]
    series = [
        cost_model.estimate(shape.n_params, w, engine, optimizer, model=shape) for w in (1, 2, 8, 64, 512)
    ]
    for a, b in itertools.pairwise(series):
        assert b.peak_bytes <= a.peak_bytes
        assert b.state_bytes <= a.state_bytes
        assert b.comm_bytes_per_step >= a.comm_bytes_per_step  # the (W-1)/W factor grows
        assert b.passes_per_step == a.passes_per_step
    if engine == "ddp":
        assert series[0].peak_bytes == series[-1].peak_bytes


def test_cost_model_passes_and_collectives():
    est = cost_model.estimate(1e9, 8, "fsdp2", "sassha", k=10)
    assert est.hessian == "finite_difference"
    assert est.passes_per_step == pytest.approx(2 + 2 / 10)
    # each pass: two all-gathers and a reduce-scatter
    counts = {}
    for name, count, _ in est.collectives:
        counts[name] = counts.get(name, 0) + count
    assert counts == pytest.approx({"all_gather": 2 * 2.2, "reduce_scatter": 2.2})
    ddp = cost_model.estimate(1e9, 8, "ddp", "sassha", k=10, exact_hvp_cost=2.0)
    assert ddp.hessian == "exact" and ddp.passes_per_step == pytest.approx(2.2)
    assert sum(c for name, c, _ in ddp.collectives if name == "all_reduce") == pytest.approx(2.1)
    adamw = cost_model.estimate(1e9, 8, "ddp", "adamw")
    assert adamw.passes_per_step == 1
    assert adamw.comm_bytes_per_step == pytest.approx(2 * 7 / 8 * 4e9)
    with pytest.raises(ValueError, match="not available"):
        cost_model.estimate(1e9, 8, "zero3", "sassha", hessian="exact")


def test_cost_model_check_matches_measurement():
    out = cost_model.check(verbose=False)
    state = out["state"]
    assert state["measured"]["adamw"] == state["predicted"] == state["measured"]["sassha"]
    for label, v in out["passes"].items():
        assert v["closure_calls_per_step"] == pytest.approx(v["predicted"]), label
    for label, v in out["transients"].items():
        assert (
            v["predicted"] - 0.01 <= v["measured"] <= v["predicted"] + v["kernel_temporaries_bound"] + 0.01
        ), label
    assert 1.5 < out["exact_activation_factor"] < 4


def test_quality_classifier_smoke(capsys):
    result = main(
        [
            "quality-classifier",
            "--data",
            "synthetic",
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--grid",
            "center",
            "--sharpness-iterations",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert "test acc" in out and "lambda_max" in out
    assert set(result["runs"]) == {"adamw", "sam-adamw", "sassha", "sassha-rho0", "msassha"}
    for runs in result["runs"].values():
        assert len(runs) == 2
        for r in runs:
            assert 0.0 <= r["final"]["test_acc"] <= 1.0 and math.isfinite(r["final"]["sharpness"])


def test_quality_lm_smoke(capsys, tmp_path):
    plot = tmp_path / "lm.png"
    result = main(
        [
            "quality-lm",
            "--steps",
            "2",
            "--seeds",
            "1",
            "--grid",
            "center",
            "--batch-size",
            "2",
            "--eval-every",
            "1",
            "--eval-blocks",
            "2",
            "--calibration-rounds",
            "1",
            "--plot",
            str(plot),
        ]
    )
    out = capsys.readouterr().out
    assert "val loss" in out and "x AdamW" in out
    assert plot.stat().st_size > 0
    for name in ("adamw", "sam-adamw", "sassha", "msassha"):
        assert math.isfinite(result["runs"][name][0]["final"]["report"])
        assert result["equal_time_steps"][name] >= 1


def test_sam_adamw_matches_manual_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    reference = nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())

    def loss_of(m):
        return ((m(x) - y) ** 2).mean()

    initial = loss_of(reference).item()
    opt = SamAdamW(model.parameters(), lr=0.1, rho=0.05, weight_decay=0.01)
    loss = train_step(opt, lambda: loss_of(model))

    params = list(reference.parameters())
    first = torch.autograd.grad(loss_of(reference), params)
    norm = torch.sqrt(sum((g * g).sum() for g in first))
    with torch.no_grad():
        theta = [p.clone() for p in params]
        for p, g in zip(params, first):
            p.add_(0.05 * g / norm)
    second = torch.autograd.grad(loss_of(reference), params)
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    adamw = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    for p, g in zip(params, second):
        p.grad = g
    adamw.step()
    assert loss.item() == pytest.approx(initial)  # the loss at theta, not at theta + eps
    for a, b in zip(model.parameters(), params):
        torch.testing.assert_close(a, b)


def test_hessian_max_eigenvalue_on_a_quadratic():
    w = torch.zeros(4, requires_grad=True)
    diag = torch.tensor([0.5, 3.0, -1.0, 2.0])
    value = hessian_max_eigenvalue(lambda: 0.5 * (diag * w * w).sum(), [w], iterations=500, tol=1e-10)
    assert value == pytest.approx(3.0, rel=1e-4)


def test_tune_stages_use_the_best_so_far():
    grid = Grid(
        {"lr": 1.0, "rho": 0.5}, (({"lr": 0.1}, {"lr": 1.0}, {"lr": 10.0}), ({"rho": 0.1}, {"rho": 0.9}))
    )
    seen = []

    def score(h):
        seen.append(dict(h))
        return abs(h["lr"] - 1.0) + abs(h["rho"] - 0.1), {}

    best, trials = tune(grid, score)
    assert best == {"lr": 1.0, "rho": 0.1}
    assert len(trials) == 5 and {"lr": 1.0, "rho": 0.9} in seen
    assert "lr in {0.1, 1, 10} at rho=0.5; then rho in {0.1, 0.9} at the best so far" in grid.describe()


def test_train_step_clipping_matches_step_when_inactive():
    """SASSHA's pass-by-pass route (used to clip) is ``step`` itself when the clip never bites."""
    from sassha_dist import Sassha

    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    models = [nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [Sassha(m.parameters(), lr=0.05, lazy_hessian=2) for m in models]
    for _ in range(4):
        train_step(opts[0], lambda: ((models[0](x) - y) ** 2).mean())
        train_step(opts[1], lambda: ((models[1](x) - y) ** 2).mean(), max_grad_norm=1e9)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_memory_comm_measures_sharded_state_memory_and_traffic(capsys):
    """Real ranks (W = 1 and 2) under FSDP2 and ZeRO-3; checks properties of the measurement itself."""
    pytest.importorskip("deepspeed")
    result = main(["memory-comm", "--quick", "--engines", "fsdp2", "zero3", "--timeout", "120"])
    out = capsys.readouterr().out
    assert "target p+c/k" in out and "Cost model" in out
    rows = {(r["engine"], r["world_size"], r["contestant"]): r for r in result["rows"]}
    n = result["n_params"]
    for (engine, world, label), r in rows.items():
        adamw = rows[(engine, world, "AdamW")]
        # (m, D) vs (m, v): the same bytes, counters excluded; the profiler saw every collective the mode did
        assert r["state_bytes"] == adamw["state_bytes"], (engine, world, label)
        assert r["collectives_counted"] == r["collectives_profiler"], (engine, world, label)
        # 1/W: half of W = 1 at W = 2, within FSDP2's dim-0 padding (< 1 row of 32 per parameter)
        one = rows[(engine, 1, label)]["state_bytes"]
        assert one / 2 <= rows[(engine, 2, label)]["state_bytes"] <= one / 2 * 1.03
        if world == 2 and label != "AdamW":
            k = r["k"]  # central differences: c = 2 gradient passes per Hessian refresh
            passes = 1 if r["perturbation"] == "momentum" else 2  # M-SASSHA: one pass per step
            assert r["grad_reduction_vs_adamw"] == pytest.approx(passes + 2 / k, rel=1e-9), (engine, label)
            assert r["hessian_steps"] == r["steps"] // k
            # SASSHA peaks above AdamW: theta's copy every step, the FD buffers on Hessian steps
            assert r["extra_buffers_hessian_step"] > r["extra_buffers_plain_step"] > 0.5 or k == 1, (
                engine,
                label,
                r["extra_buffers_plain_step"],
                r["peak_plain_step"],
                r["adamw_peak_bytes"],
            )
    # Textbook FSDP2 AdamW per step: per FSDP unit (4 Linear layers) an all-gather for forward and one
    # for backward, and one reduce-scatter of gradients, each the (padded) parameters' size.
    fsdp = rows[("fsdp2", 2, "AdamW")]["traffic"]
    assert fsdp["param_gather"]["count"] == 8 and fsdp["grad_reduction"]["count"] == 4
    assert 2 * 4 * n <= fsdp["param_gather"]["payload"] <= 2 * 4 * n * 1.03
    assert fsdp["scalar"]["count"] == 0
    # ZeRO-3 AdamW: DeepSpeed keeps this small model gathered from forward to backward (its default
    # reuse distance), so one all-gather and one reduce-scatter of the padded parameters per step.
    zero = rows[("zero3", 2, "AdamW")]["traffic"]
    assert 4 * n <= zero["param_gather"]["payload"] == zero["grad_reduction"]["payload"] <= 4 * n * 1.03
    # The cost model against the measurement: state and gradient traffic within padding.
    for c in result["cost_model"]:
        measured, model = c["state"]
        assert model <= measured <= model * 1.03, c
        measured, model = c["grad_reduction_sent"]
        assert model <= measured <= model * 1.03, c
