"""Hessian-vector products: exact (double backward) and finite differences, and Hutchinson's estimator."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sassha_dist import Sassha
from sassha_dist.hessian import exact_hvp, finite_difference_step, probe_key, rademacher
from sassha_dist.hessian.hvp import (
    UNDERFLOW_SAFE_EPS,
    UNDERFLOW_WARNING_FRACTION,
    curvature_underflow,
    default_fd_step,
)
from tests.helpers import make_batches, make_mlp, mse


def _flat_hessian(model, batch) -> torch.Tensor:
    """The full Hessian of the loss w.r.t. all parameters (flattened, in ``parameters()`` order)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat_params):
        parts = [x.reshape(s) for x, s in zip(flat_params.split(sizes), shapes, strict=True)]
        x, y = batch
        return ((functional_call(model, dict(zip(names, parts, strict=True)), (x,)) - y) ** 2).mean()

    return hessian(loss_of)(flat)


def _probe(params, index: int, dtype=None, seed: int = 0):
    return [
        rademacher(probe_key(seed, index, j, 0), p.numel(), dtype=dtype or p.dtype).view_as(p)
        for j, p in enumerate(params)
    ]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _gradients(model, batch, point=None, create_graph=False, autocast=False):
    """The gradient of the loss at ``point`` (written into the model's parameters) or at the current ones."""
    params = list(model.parameters())
    if point is not None:
        with torch.no_grad():
            for p, x in zip(params, point, strict=True):
                p.copy_(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = mse(model, batch)
    return list(torch.autograd.grad(loss.float(), params, create_graph=create_graph))


def test_exact_hvp_equals_full_hessian_times_vector():
    model = make_mlp((3, 5, 1))
    batch = make_batches(1, batch=16)[0]
    H = _flat_hessian(model, batch)
    params = list(model.parameters())
    grads = _gradients(model, batch, create_graph=True)
    for i in range(3):
        z = _probe(params, i)
        hz = exact_hvp(grads, params, z, retain_graph=True)
        # float64, 26x26 matrix: both sides are sums of ~26 O(1) terms, so they agree to ~1e-15 relative;
        # 1e-12 leaves three orders of margin and still catches any wrong term.
        torch.testing.assert_close(_flat(hz), H @ _flat(z), rtol=1e-12, atol=1e-12)


def test_hutchinson_is_unbiased_for_the_hessian_diagonal():
    """mean over N probes of z * (H z) -> diag(H), with z from the optimizer's own probe stream.

    One sample of element i is ``H_ii + sum_{j != i} H_ij z_i z_j``: mean ``H_ii``, variance
    ``sum_{j != i} H_ij^2``. We standardise the error of the N-sample mean by the per-element sample
    standard deviation: ``(mean - H_ii) / (std / sqrt(N))`` is ~N(0, 1) by the CLT. Over 26 elements,
    ``max |z| < 5`` fails by chance with probability ~26 * 6e-7, so a failure means a biased estimator
    (e.g. probes that are not +-1, or correlated between parameters or across Hessian updates).
    """
    n_probes = 4000
    model = make_mlp((3, 5, 1))
    batch = make_batches(1, batch=16)[0]
    H = _flat_hessian(model, batch)
    diag = H.diagonal()
    params = list(model.parameters())
    grads = _gradients(model, batch, create_graph=True)
    samples = torch.stack(
        [
            _flat(z) * _flat(exact_hvp(grads, params, z, retain_graph=True))
            for z in (_probe(params, i) for i in range(n_probes))
        ]
    )
    mean, std = samples.mean(0), samples.std(0)
    theory = (H.square().sum(1) - diag.square()).sqrt()  # sqrt(sum_{j != i} H_ij^2)
    assert bool((theory > 1e-3).all())  # every element is actually noisy: the test is not trivial
    # Sample std vs the exact Rademacher std: the sum of Rademacher terms has kurtosis <= 3, so the
    # relative sd of the sample std is <= sqrt(1/(2N)) ~ 1.1%; 10% is > 8 sigma, so a failure means the
    # probes are not independent fair +-1 values (which would also invalidate the z-scores below).
    torch.testing.assert_close(std, theory, rtol=0.1, atol=0.0)
    z_scores = (mean - diag) / (std / math.sqrt(n_probes))
    print(f"\nHutchinson N={n_probes}: max |z-score| {float(z_scores.abs().max()):.2f} over {diag.numel()}")
    assert float(z_scores.abs().max()) < 5.0
    # A single probe is far from the diagonal, so the agreement above comes from averaging, not luck.
    assert float((samples[0] - diag).abs().max()) > 10 * float((mean - diag).abs().max())


def _fd_relative_errors(model, batch, h0, scheme, truth_model=None, truth_batch=None, autocast=False):
    """Mean relative error ``|z*(FD Hz) - z*(exact Hz)| / |z*(exact Hz)|`` over 10 probes.

    The FD step is the global rule ``h = h0 * ||w|| / ||z||``; the exact product is taken by double backward
    on ``truth_model`` (default: the model itself, in its own precision, without autocast).
    """
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    h = finite_difference_step(h0, float(_flat(w).double().norm()), sum(p.numel() for p in w))
    truth_model = truth_model or model
    truth_batch = truth_batch or batch
    truth_params = list(truth_model.parameters())
    errors = []
    for i in range(10):
        z = _probe(params, i)
        grads = _gradients(truth_model, truth_batch, [x.to(truth_params[0].dtype) for x in w], True)
        zt = [x.to(truth_params[0].dtype) for x in z]
        exact = _flat(zt) * _flat(exact_hvp(grads, truth_params, zt, retain_graph=False))
        plus = _gradients(model, batch, [x + h * zi for x, zi in zip(w, z, strict=True)], autocast=autocast)
        if scheme == "central":
            minus = _gradients(
                model, batch, [x - h * zi for x, zi in zip(w, z, strict=True)], autocast=autocast
            )
            fd = (_flat(plus).double() - _flat(minus).double()) / (2 * h)
        else:
            base = _gradients(model, batch, w, autocast=autocast)
            fd = (_flat(plus).double() - _flat(base).double()) / h
        estimate = _flat(z).double() * fd
        exact = exact.double()
        errors.append(float((estimate - exact).norm() / exact.norm()))
    with torch.no_grad():
        for p, x in zip(params, w, strict=True):
            p.copy_(x)
    return sum(errors) / len(errors)


SIZES = (8, 16, 16, 1)


def _fd_setup(dtype):
    return make_mlp(SIZES, dtype, seed=3), make_batches(1, 8, 1, 64, dtype, seed=4)[0]


def test_finite_difference_truncation_orders_in_float64():
    """In float64 (rounding negligible) central is O(h^2) and forward O(h): 10x smaller h gives ~100x / ~10x.

    Measured ratios (h0 = 1e-2 -> 1e-3): central 99.5, forward 9.8. The windows [50, 200] and [5, 20] are
    a factor of two either side, far from the other scheme's ratio.
    """
    model, batch = _fd_setup(torch.float64)
    central = [_fd_relative_errors(model, batch, h0, "central") for h0 in (1e-2, 1e-3)]
    forward = [_fd_relative_errors(model, batch, h0, "forward") for h0 in (1e-2, 1e-3)]
    assert 50 < central[0] / central[1] < 200
    assert 5 < forward[0] / forward[1] < 20


def test_finite_difference_fp32_central_and_forward():
    """fp32 FD against the fp32 exact double backward, global step rule (SPEC §4).

    Measured on this 8-16-16-1 MLP (mean of 10 probes): central h0=1e-3 -> 6.5e-5 (SPEC, tiny GPT-2:
    5.5e-5); forward h0=1e-4 -> 8.8e-4 (SPEC: 1.0e-3); forward h0=1e-3 (the optimizer's default step)
    -> 5.8e-3. Bounds are ~4x the measurement: enough for another BLAS' summation order (the rounding
    part scales with eps_fp32 / h), while a wrong step rule (e.g. per-tensor h, or h without ||w||) or
    a wrong divisor (h instead of 2h) gives errors of order 1.
    """
    model, batch = _fd_setup(torch.float32)
    h0 = default_fd_step(torch.float32)
    assert h0 == 1e-3
    central = _fd_relative_errors(model, batch, h0, "central")
    forward_small = _fd_relative_errors(model, batch, 1e-4, "forward")
    forward_default = _fd_relative_errors(model, batch, h0, "forward")
    print(
        f"\nFD fp32: central(1e-3) {central:.2e}, forward(1e-4) {forward_small:.2e}, forward(1e-3) "
        f"{forward_default:.2e}"
    )
    assert central < 3e-4
    assert forward_small < 4e-3
    assert forward_default < 2.5e-2
    assert central < forward_small  # central is the more accurate scheme at its best step


@pytest.mark.parametrize("mode", ["bf16 model", "bf16 autocast"])
def test_finite_difference_bf16_is_recorded(mode):
    """bf16 FD at the default h0 = 2.5e-2, against a float64 exact HVP at the same weights.

    Measured (mean of 10 probes): bf16 parameters 7.5%, fp32 parameters under bf16 autocast 5.6%
    (SPEC, tiny GPT-2 autocast: 3-4%). Bound 0.2 (~3x): this records that the default step is usable
    (one Hutchinson sample's own error is ~16x ||diag H||, SPEC §4), not an accuracy promise.
    """
    h0 = default_fd_step(torch.bfloat16)
    assert h0 == 2.5e-2
    truth_model, truth_batch = _fd_setup(torch.float64)
    if mode == "bf16 model":
        model, _ = _fd_setup(torch.bfloat16)
        batch = tuple(t.to(torch.bfloat16) for t in truth_batch)
        # the truth is taken at the bf16-rounded weights
        with torch.no_grad():
            for p, q in zip(truth_model.parameters(), model.parameters(), strict=True):
                p.copy_(q)
        error = _fd_relative_errors(model, batch, h0, "central", truth_model, truth_batch)
    else:
        model, batch = _fd_setup(torch.float32)
        error = _fd_relative_errors(model, batch, h0, "central", truth_model, truth_batch, autocast=True)
    print(f"\nFD {mode}: central(h0={h0}) relative error {error:.3f}")
    assert error < 0.2


def test_finite_difference_step_rule():
    # h = h0 * ||w|| / sqrt(numel): ||h z|| = h0 ||w|| for a Rademacher z.
    assert finite_difference_step(1e-3, 6.0, 4) == pytest.approx(3e-3, rel=1e-15)
    assert finite_difference_step(1e-3, 0.0, 4) == 1e-3  # relative step undefined at w = 0
    with pytest.raises(ValueError, match="num_elements"):
        finite_difference_step(1e-3, 1.0, 0)


def test_exact_hvp_unreached_and_constant_gradients_give_zeros():
    a = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    unused = torch.ones(4, dtype=torch.float64, requires_grad=True)
    params = [a, b, unused]
    # Quadratic in a (Hessian diag 2*3), linear in b (constant gradient, no graph), unused not reached.
    loss = 3 * (a**2).sum() + (b * torch.tensor([2.0, 5.0], dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    assert grads[2] is None and not grads[1].requires_grad
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    z = _probe(params, 0)
    hz = exact_hvp(grads, params, z, retain_graph=False)
    assert torch.equal(hz[0], 6 * z[0])  # exact in float64: 6 * (+-1)
    assert torch.equal(hz[1], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(hz[2], torch.zeros(4, dtype=torch.float64))
    # A loss linear in every parameter: no gradient has a graph, the product is zero everywhere.
    grads = torch.autograd.grad((b * 2).sum() + unused.sum(), [b, unused], create_graph=True)
    assert all(
        torch.equal(h, torch.zeros_like(p))
        for h, p in zip(exact_hvp(grads, [b, unused], z[1:], retain_graph=False), [b, unused], strict=True)
    )


@pytest.mark.parametrize(
    ("dtype", "eps", "warns"),
    [(torch.float32, 1e-4, False), (torch.bfloat16, 1e-4, True), (torch.bfloat16, UNDERFLOW_SAFE_EPS, False)],
)
def test_low_precision_underflow_is_reported_and_warned(dtype, eps, warns, caplog):
    """bf16 gradients quantise g(w+hz) - g(w-hz): coordinates whose difference is below one rounding
    step get an estimate of exactly 0 with a nonzero gradient, so D stays 0 and they would step by
    lr * m / eps. On this MLP 1.0% of the bf16 coordinates do (0 in fp32); Sassha reports the
    fraction and warns once, naming the fix, unless eps is already large enough."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).to(dtype)
    x, y = torch.randn(32, 16, dtype=dtype), torch.randn(32, 1, dtype=dtype)
    opt = Sassha(model.parameters(), lr=0.1, eps=eps, lazy_hessian=1, hessian_method="finite_difference")
    fractions = []
    with caplog.at_level(logging.WARNING, logger="sassha_dist.optimizer"):
        for _ in range(3):  # three refreshes; the warning comes once
            opt.step(lambda: nn.functional.mse_loss(model(x), y))
            fractions.append(float(opt.last_report.hessian_underflow))
    fraction = fractions[0]
    warnings = [r for r in caplog.records if "underflowed" in r.getMessage()]
    if dtype == torch.float32:
        assert fractions == [0.0, 0.0, 0.0]
    else:
        assert fraction > UNDERFLOW_WARNING_FRACTION
    if warns:
        assert len(warnings) == 1 and "eps=1e-2" in warnings[0].getMessage()  # once, with the fix
    else:
        assert not warnings


def test_curvature_underflow_counts_only_moving_coordinates():
    estimates = [torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.zeros(0)]
    gradients = [torch.tensor([0.5, 0.0, 0.5, -1e-30]), torch.zeros(0)]
    # coordinates 0 and 3 moved (nonzero gradient) with a zero estimate; 1 did not move
    assert float(curvature_underflow(estimates, gradients)) == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_difference_pass_returns_to_w_and_the_perturbed_gradient(dtype):
    """After hessian_pass the parameters are back at w = theta + eps and p.grad is the perturbed
    gradient (the same tensors). Full precision moves w by +hz, -2hz, +hz without a copy, so w comes
    back within three roundings of |w| + 2h; low precision, whose rounding is not small next to hz,
    keeps an exact copy of w."""
    model = make_mlp((4, 16, 1), dtype=dtype)
    batch = make_batches(1, in_dim=4, dtype=dtype)[0]
    opt = Sassha(
        model.parameters(), lr=0.1, lazy_hessian=1, hessian_method="finite_difference", fd_step=2.5e-2
    )
    closure = lambda: mse(model, batch)  # noqa: E731
    opt.perturb(opt.gradient_pass(closure))
    opt.perturbed_pass(closure)
    params = list(model.parameters())
    point = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    opt.hessian_pass(closure)
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))
    if dtype == torch.bfloat16:
        assert all(torch.equal(p, w) for p, w in zip(params, point, strict=True))
    else:
        norm = math.sqrt(sum(float((w.double() ** 2).sum()) for w in point))
        h = finite_difference_step(2.5e-2, norm, sum(p.numel() for p in params))
        eps = torch.finfo(dtype).eps
        for p, w in zip(params, point, strict=True):
            assert bool(((p - w).abs() <= 3 * eps * (w.abs() + 2 * h)).all())
    opt.update()
