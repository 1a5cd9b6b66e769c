"""The foreach and for-loop paths of every kernel agree bit for bit (torch.equal) on CPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from sassha_dist.functional import (
    CPU_FOREACH_MAX_MEAN_NUMEL,
    UpdateHyperparameters,
    _resolve_foreach,
    apply_perturbation,
    perturbation_sq_norm,
    sassha_update,
    sq_norm,
    state_dtype,
    update_hessian_ema,
)

SHAPES = [(7,), (3, 4), (2, 3, 5), (1,), (4, 1, 2), (0,)]  # mixed shapes, including an empty tensor
DTYPES = {
    "fp32": [torch.float32] * len(SHAPES),
    "fp64": [torch.float64] * len(SHAPES),
    "bf16": [torch.bfloat16] * len(SHAPES),
    # several dtypes in one list: the foreach path buckets by dtype, the loop path does not
    "mixed": [torch.float32, torch.bfloat16, torch.float64, torch.bfloat16, torch.float32, torch.float64],
    # a bf16 model with some fp32 parameters (e.g. norms kept in fp32): the realistic mixed case
    "bf16+fp32": [torch.bfloat16, torch.float32] * 3,
}


def _tensors(dtypes, seed, scale=1.0, positive=False, as_state=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in zip(SHAPES, dtypes, strict=True):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        if positive:
            x = x.abs() + 0.01
        out.append(x.to(state_dtype(dtype) if as_state else dtype))
    return out


def _clone(tensors):
    return [t.clone() for t in tensors]


def _assert_equal(a, b):
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"tensor {i} differs"


@pytest.mark.parametrize("kind", list(DTYPES))
def test_sq_norm(kind):
    # Several draws: summing the per-tensor norms in another order changes the last bit only sometimes.
    for seed in range(20):
        tensors = _tensors(DTYPES[kind], seed)
        loop, fused = sq_norm(tensors, foreach=False), sq_norm(tensors, foreach=True)
        assert loop.dtype == fused.dtype == _widest(DTYPES[kind])
        assert torch.equal(loop, fused), f"seed {seed}: {float(loop)!r} != {float(fused)!r}"
        # and it is the squared norm, accumulated in >= fp32: a few dozen terms round to < 1e-6 relative
        expected = sum(float(t.double().square().sum()) for t in tensors)
        assert float(loop) == pytest.approx(expected, rel=1e-6)


def _widest(dtypes):
    widest = torch.float32
    for d in dtypes:
        widest = torch.promote_types(widest, state_dtype(d))
    return widest


def test_sq_norm_of_nothing_is_zero():
    assert float(sq_norm([], foreach=True)) == 0.0 == float(sq_norm([], foreach=False))


@pytest.mark.parametrize("kind, adaptive", list(itertools.product(DTYPES, (False, True))))
def test_perturbation(kind, adaptive):
    params = _tensors(DTYPES[kind], 1)
    grads = _tensors(DTYPES[kind], 2, scale=0.1)
    # 0-dim scales rho_group / (||g|| + eps): two groups with different rho.
    norm = perturbation_sq_norm(params, grads, adaptive=adaptive, foreach=False).sqrt()
    assert torch.equal(norm, perturbation_sq_norm(params, grads, adaptive=adaptive, foreach=True).sqrt())
    scales = [torch.tensor(0.05 if i % 2 else 0.2) / (norm + 1e-12) for i in range(len(params))]
    loop, fused = _clone(params), _clone(params)
    apply_perturbation(loop, grads, scales, adaptive=adaptive, foreach=False)
    apply_perturbation(fused, grads, scales, adaptive=adaptive, foreach=True)
    _assert_equal(loop, fused)
    # It did move the parameters by c * (theta^2 if adaptive) * g (checked in float64; the kernels round
    # in the param dtype, so allow a few units in the last place of bf16: 2**-7 relative).
    for p, q, g, c in zip(params, loop, grads, scales, strict=True):
        step = float(c) * g.double() * (p.double() ** 2 if adaptive else 1.0)
        torch.testing.assert_close(q.double(), p.double() + step, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("kind", list(DTYPES))
def test_hessian_ema(kind):
    dtypes = DTYPES[kind]
    diags = _tensors(dtypes, 3, positive=True, as_state=True)
    estimates = _tensors(dtypes, 4, as_state=True)  # signed: the EMA takes |estimate|
    betas = [0.999, 0.99, 0.9, 0.999, 0.5, 0.0]  # one beta2 per tensor (per group)
    loop, fused = _clone(diags), _clone(diags)
    update_hessian_ema(loop, estimates, betas, foreach=False)
    update_hessian_ema(fused, estimates, betas, foreach=True)
    _assert_equal(loop, fused)
    for d0, d1, e, b in zip(diags, loop, estimates, betas, strict=True):
        # lerp in the state dtype vs the formula in float64: a few fp32 ulps
        torch.testing.assert_close(
            d1.double(), b * d0.double() + (1 - b) * e.double().abs(), rtol=1e-6, atol=0
        )


UPDATE_COMBOS = list(
    itertools.product(
        ("after_power", "inside_power"),
        ("hessian_refreshes", "global_step", "none"),
        ("lr_scaled", "lr_independent"),
        (0.0, 0.1),  # weight decay off (the kernel skips the multiply) and on
        (0.5, 1.0, 0.8),
        (True, False),  # bias correction of m
    )
)


@pytest.mark.parametrize("kind", list(DTYPES))
@pytest.mark.parametrize(
    "eps_placement, bias_correction, wd_mode, weight_decay, power, momentum_correction", UPDATE_COMBOS
)
def test_sassha_update(
    kind, eps_placement, bias_correction, wd_mode, weight_decay, power, momentum_correction
):
    dtypes = DTYPES[kind]
    params = _tensors(dtypes, 5)
    grads = _tensors(dtypes, 6)  # perturbed gradients come in the param dtype
    momenta = _tensors(dtypes, 7, scale=0.1, as_state=True)
    diags = _tensors(dtypes, 8, positive=True, as_state=True)
    steps = [5, 5, 1, 12, 3, 5]  # per-tensor counters, as with params that joined late
    hessian_updates = [2, 2, 1, 4, 1, 2]
    refresh_steps = [1, 1, 1, 11, 1, 1]  # each tensor's step at its last refresh ("global_step")
    hyper = UpdateHyperparameters(
        lr=0.07,
        beta1=0.9,
        beta2=0.999,
        weight_decay=weight_decay,
        eps=1e-4,
        hessian_power=power,
        eps_placement=eps_placement,
        bias_correction=bias_correction,
        weight_decay_mode=wd_mode,
        momentum_bias_correction=momentum_correction,
    )
    corrections = [
        hyper.hessian_correction(n, 1.0 - 0.999**t, 0.7) for n, t in zip(hessian_updates, refresh_steps)
    ]
    runs = []
    for foreach in (False, True):
        p, m = _clone(params), _clone(momenta)
        sassha_update(p, grads, m, _clone(diags), steps, corrections, hyper, foreach=foreach)
        runs.append(p + m)
    _assert_equal(*runs)
    for p0, p1 in zip(params, runs[0][: len(params)], strict=True):
        assert p1.dtype == p0.dtype
    # state dtype is kept: fp32 for bf16 params
    for m, d in zip(runs[0][len(params) :], dtypes, strict=True):
        assert m.dtype == state_dtype(d)


def test_cpu_default_uses_foreach_only_for_small_tensors():
    """foreach=None on CPU: the foreach kernels for tensors averaging at most
    CPU_FOREACH_MAX_MEAN_NUMEL elements (dispatch-bound), the for-loop above (cache-bound)."""
    small = [torch.zeros(CPU_FOREACH_MAX_MEAN_NUMEL), torch.zeros(CPU_FOREACH_MAX_MEAN_NUMEL)]
    large = [torch.zeros(CPU_FOREACH_MAX_MEAN_NUMEL), torch.zeros(CPU_FOREACH_MAX_MEAN_NUMEL + 2)]
    assert _resolve_foreach(None, small) is True
    assert _resolve_foreach(None, large) is False
    assert _resolve_foreach(False, small) is False and _resolve_foreach(True, large) is True
