"""Tests of the oracle ``sassha_dist.reference`` against closed forms and its own invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sassha_dist.hessian.probes import probe_key, rademacher
from sassha_dist.reference import ReferenceConfig, ReferenceSassha

SIZES = (3, 5)


def _quadratic_coeffs(seed: int = 0):
    """Mixed-sign diagonal curvature ``a`` (|a| in [0.5, 2]) and offsets ``b``, one pair per tensor."""
    gen = torch.Generator().manual_seed(seed)
    coeffs = []
    for size in SIZES:
        sign = torch.where(torch.rand(size, generator=gen) < 0.3, -1.0, 1.0)
        a = (sign * (0.5 + 1.5 * torch.rand(size, generator=gen))).double()
        b = torch.randn(size, generator=gen, dtype=torch.float64)
        coeffs.append((a, b))
    return coeffs


def quadratic_loss(params, batch):
    """``f(θ) = Σ_i 0.5 Σ a_i θ_i² + Σ b_i θ_i``; ``batch`` is the list of ``(a_i, b_i)``."""
    return sum(0.5 * (a * p**2).sum() + (b * p).sum() for p, (a, b) in zip(params, batch))


def _init_params(dtype=torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(size, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for size in SIZES
    ]


def closed_form(theta, coeffs, cfg: ReferenceConfig, lrs, steps: int):
    """Independent SASSHA recurrence for the diagonal quadratic, where ``z ⊙ (H z) = a`` exactly."""
    theta = [x.detach().clone().double() for x in theta]
    m = [torch.zeros_like(x) for x in theta]
    D = [torch.zeros_like(x) for x in theta]
    b1, b2 = cfg.betas
    n = 0
    c_r = k_r = 1.0  # the authors' correction, frozen at each refresh: 1 - b2^t_r and the power then
    for t in range(1, steps + 1):
        g = [a * x + b for x, (a, b) in zip(theta, coeffs)]
        s = [x.abs() if cfg.adaptive else torch.ones_like(x) for x in theta]
        norm = math.sqrt(sum(float(((si * gi) ** 2).sum()) for si, gi in zip(s, g)))
        e = [cfg.rho * si**2 * gi / (norm + cfg.perturb_eps) for si, gi in zip(s, g)]
        gt = [a * (x + ei) + b for x, ei, (a, b) in zip(theta, e, coeffs)]
        k = cfg.hessian_power(t) if callable(cfg.hessian_power) else cfg.hessian_power
        if (t - 1) % cfg.lazy_hessian == 0:
            D = [b2 * Di + (1 - b2) * a.abs() for Di, (a, _) in zip(D, coeffs)]
            n += 1
            c_r, k_r = 1 - b2**t, k
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, gt)]
        inside, after = {  # what divides D inside the power, and D^k after it
            "hessian_refreshes": (1 - b2**n, (1 - b2**n) ** k),
            "global_step": (c_r, c_r**k_r),
            "none": (1.0, 1.0),
        }[cfg.bias_correction]
        new = []
        for x, mi, Di, lr in zip(theta, m, D, lrs):
            if cfg.eps_placement == "after_power":
                den = Di**k / after + cfg.eps
            else:
                den = (Di / inside + cfg.eps) ** k
            wd = cfg.weight_decay * (lr if cfg.weight_decay_mode == "lr_scaled" else 1.0)
            new.append(x - lr * (mi / (1 - b1**t)) / den - wd * x)
        theta = new
    return theta


def _assert_close(actual, expected, rtol=1e-6, atol=1e-9):
    for x, y in zip(actual, expected):
        torch.testing.assert_close(x.detach(), y, rtol=rtol, atol=atol)


def _schedule(t: int) -> float:
    return 1.0 if t <= 3 else 0.5


COMBOS = [
    {"lazy_hessian": lh, "rho": rho, "hessian_power": hp, "bias_correction": bc}
    for lh, rho, hp, bc in itertools.product(
        (1, 3), (0.0, 0.1), (0.5, 1.0, _schedule), ("hessian_refreshes", "global_step", "none")
    )
] + [
    {
        "lazy_hessian": lh,
        "rho": 0.1,
        "eps_placement": ep,
        "weight_decay": 0.05,
        "weight_decay_mode": wm,
        "adaptive": ad,
    }
    for lh, ep, wm, ad in itertools.product(
        (1, 3), ("after_power", "inside_power"), ("lr_scaled", "lr_independent"), (False, True)
    )
]


@pytest.mark.parametrize("overrides", COMBOS)
def test_quadratic_matches_closed_form(overrides):
    coeffs = _quadratic_coeffs()
    cfg = ReferenceConfig(lr=0.05, **overrides)
    params = _init_params()
    start = [p.detach().clone() for p in params]
    opt = ReferenceSassha(params, cfg)
    for _ in range(15):
        opt.step(quadratic_loss, [coeffs])
    assert opt.step_count == 15 and opt.skipped_steps == 0
    assert opt.hessian_refreshes == len(range(0, 15, cfg.lazy_hessian))
    _assert_close(params, closed_form(start, coeffs, cfg, [cfg.lr] * len(SIZES), 15))


def test_group_overrides_and_two_ranks():
    """Per-group lr; W=2 ranks with different quadratics equal one quadratic with averaged a, b."""
    coeffs_0, coeffs_1 = _quadratic_coeffs(0), _quadratic_coeffs(5)
    averaged = [((a0 + a1) / 2, (b0 + b1) / 2) for (a0, b0), (a1, b1) in zip(coeffs_0, coeffs_1)]
    cfg = ReferenceConfig(lr=0.05, lazy_hessian=2, rho=0.1, n_samples=2)
    params = _init_params()
    start = [p.detach().clone() for p in params]
    opt = ReferenceSassha([{"params": params[:1]}, {"params": params[1:], "lr": 0.02}], cfg)
    for _ in range(10):
        opt.step(quadratic_loss, [coeffs_0, coeffs_1])
    # Ht = mean_r z_r ⊙ (a_r ⊙ z_r) = mean_r a_r exactly, so D tracks |mean_r a_r|.
    _assert_close(params, closed_form(start, averaged, cfg, [0.05, 0.02], 10))


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_finite_difference_matches_exact_on_quadratic(scheme):
    coeffs = _quadratic_coeffs()
    cfg = ReferenceConfig(
        lr=0.05, lazy_hessian=1, rho=0.1, hessian_method="finite_difference", fd_scheme=scheme
    )
    params = _init_params()
    start = [p.detach().clone() for p in params]
    opt = ReferenceSassha(params, cfg)
    for _ in range(15):
        opt.step(quadratic_loss, [coeffs])
    _assert_close(params, closed_form(start, coeffs, cfg, [cfg.lr] * len(SIZES), 15))


def coupled_loss(params, batch):
    """Non-diagonal Hessian so probes matter: ``0.5 xᵀ A x + Σ sin(x)`` with ``x = cat(params)``."""
    A, c = batch
    x = torch.cat([p.reshape(-1) for p in params])
    return 0.5 * x @ (A @ x) + (c * torch.sin(x)).sum()


def _coupled_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(sum(SIZES), sum(SIZES), generator=gen, dtype=torch.float64)
    return (M + M.T) / 2, torch.randn(sum(SIZES), generator=gen, dtype=torch.float64)


def _run(cfg, batches_per_step, steps=6, loss_fn=coupled_loss):
    params = _init_params()
    opt = ReferenceSassha(params, cfg)
    losses = [opt.step(loss_fn, batches_per_step) for _ in range(steps)]
    return params, opt, losses


def test_first_hessian_estimate_uses_documented_probes():
    """D after one step is (1 - β₂)|(1/S) Σ_s z_s ⊙ (A z_s)| for the pure quadratic (c = 0)."""
    A, _ = _coupled_batch(3)
    cfg = ReferenceConfig(n_samples=3, seed=7, lazy_hessian=1)
    _, opt, _ = _run(cfg, [(A, torch.zeros(sum(SIZES), dtype=torch.float64))], steps=1)
    est = torch.zeros(sum(SIZES), dtype=torch.float64)
    for s in range(3):
        z = torch.cat(
            [rademacher(probe_key(7, 0, i, s, rank=0), n, dtype=torch.float64) for i, n in enumerate(SIZES)]
        )
        est += z * (A @ z) / 3
    torch.testing.assert_close(torch.cat(opt.D), (1 - cfg.betas[1]) * est.abs(), rtol=1e-12, atol=1e-14)


def test_per_rank_and_global_probes_agree_for_one_rank_only():
    batch_0, batch_1 = _coupled_batch(0), _coupled_batch(1)
    kw = {"lazy_hessian": 2, "n_samples": 2, "rho": 0.05}
    one = [_run(ReferenceConfig(probe_mode=mode, **kw), [batch_0])[0] for mode in ("per_rank", "global")]
    for x, y in zip(*one):
        assert torch.equal(x, y)
    two = [
        _run(ReferenceConfig(probe_mode=mode, **kw), [batch_0, batch_1])[0] for mode in ("per_rank", "global")
    ]
    assert any(not torch.allclose(x, y) for x, y in zip(*two))


def test_local_perturbation_differs_only_with_several_ranks():
    batch_0, batch_1 = _coupled_batch(0), _coupled_batch(1)
    kw = {"lazy_hessian": 2, "rho": 0.1}
    one = [_run(ReferenceConfig(local_perturbation=lp, **kw), [batch_0])[0] for lp in (False, True)]
    for x, y in zip(*one):
        assert torch.equal(x, y)
    two = [_run(ReferenceConfig(local_perturbation=lp, **kw), [batch_0, batch_1])[0] for lp in (False, True)]
    assert any(not torch.allclose(x, y) for x, y in zip(*two))


@pytest.mark.parametrize("bad_call", [0, 1])  # 0: loss at θ is NaN; 1: only the perturbed gradient is NaN
def test_non_finite_step_is_skipped(bad_call):
    batch = _coupled_batch(0)
    calls = {"n": 0, "poison": False}

    def loss_fn(params, b):
        loss = coupled_loss(params, b)
        if calls["poison"] and calls["n"] == bad_call:
            loss = loss * float("nan")
        calls["n"] += 1
        return loss

    cfg = ReferenceConfig(lazy_hessian=1)
    params = _init_params()
    opt = ReferenceSassha(params, cfg)
    opt.step(loss_fn, [batch])
    opt.step(loss_fn, [batch])
    before = [p.detach().clone() for p in params] + [x.clone() for x in opt.m + opt.D]
    calls.update(n=0, poison=True)
    loss = opt.step(loss_fn, [batch])
    calls["poison"] = False
    assert math.isnan(loss) == (bad_call == 0)
    assert opt.skipped_steps == 1 and opt.step_count == 2 and opt.hessian_refreshes == 2
    for x, y in zip([p.detach() for p in params] + opt.m + opt.D, before):
        assert torch.equal(x, y)
    # The skipped step leaves no trace: continuing equals a run that never saw it.
    opt.step(loss_fn, [batch])
    clean, _, _ = _run(cfg, [batch], steps=3)
    for x, y in zip(params, clean):
        assert torch.equal(x, y)


def test_bf16_params_keep_fp32_state_and_unused_params_stay_put():
    params = [
        p.requires_grad_() for p in (torch.ones(4, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16))
    ]
    opt = ReferenceSassha(params, ReferenceConfig(lazy_hessian=1))

    def loss_fn(ps, batch):
        return ((ps[0].float() - batch) ** 4).sum()  # ps[1] is unused: zero gradient

    for _ in range(3):
        opt.step(loss_fn, [torch.zeros(4)])
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(x.dtype == torch.float32 for x in opt.m + opt.D)
    assert torch.all(params[0] < 1) and torch.equal(params[1], torch.ones(2, dtype=torch.bfloat16))
    assert opt.skipped_steps == 0


def test_oracle_replays_dropout_masks_like_sassha():
    """With dropout on, the oracle's finite-difference D matches its exact D and Sassha's, because
    every evaluation of a rank's loss in a step replays its masks (``replay_rng``). Bound: the fp32
    central-difference tolerance of the dropout-free tests, 3e-4 (measured 7.2e-5 and 3.8e-5);
    without the replay the oracle's FD D is off by 240x."""
    import copy

    from torch import nn

    from sassha_dist import Sassha
    from sassha_dist import state_keys as keys

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1)).train()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g))
    names = [n for n, _ in model.named_parameters()]
    twin = copy.deepcopy(model)

    def loss_fn(ps, b):
        return nn.functional.mse_loss(torch.func.functional_call(twin, dict(zip(names, ps)), (b[0],)), b[1])

    def rel(a, b):
        a, b = torch.cat([x.reshape(-1) for x in a]), torch.cat([x.reshape(-1) for x in b])
        return float((a - b).norm() / b.norm())

    kw = {"lr": 0.05, "rho": 0.05, "probe_mode": "global"}
    diags = {}
    for method in ("exact", "finite_difference"):
        for replay in (True, False):
            ps = [p.detach().clone().requires_grad_() for p in model.parameters()]
            ref = ReferenceSassha(ps, ReferenceConfig(hessian_method=method, replay_rng=replay, **kw))
            torch.manual_seed(5)
            ref.step(loss_fn, [batch])
            diags[("ref", method, replay)] = ref.D
        m = copy.deepcopy(model)
        opt = Sassha(m.parameters(), hessian_method=method, **kw)
        torch.manual_seed(5)
        opt.step(lambda m=m: nn.functional.mse_loss(m(batch[0]), batch[1]))
        diags[("sassha", method)] = [opt.state[p][keys.HESSIAN_DIAG] for p in m.parameters()]
    fd = diags[("ref", "finite_difference", True)]
    assert rel(fd, diags[("ref", "exact", True)]) < 3e-4
    assert rel(fd, diags[("sassha", "finite_difference")]) < 3e-4
    assert rel(diags[("ref", "finite_difference", False)], diags[("ref", "exact", False)]) > 1.0
