"""SASSHA on a CUDA device against the same run on the CPU (``pytest -m cuda``; skipped without CUDA).

``launch/gpu/check.sh`` runs this file first on a lent GPU. The tests train fresh copies of one
small float64 GELU MLP on fixed batches and compare the device's run with the CPU's run of the
same options, or two device paths that must agree (foreach and for-loop; a resumed and an
uninterrupted run).

Tolerance ``DEVICE_RTOL`` (1e-9 relative, on the update ``theta_T - theta_0`` and on every loss):
the arithmetic is the same on both devices except the order of the sums inside the matmul and
norm kernels, ~1e-16 relative per operation in float64; the preconditioner divides by
``sqrt(D) + eps`` and amplifies that where ``D`` is small, over 6 steps. Probes come from a
counter hash and are identical on both devices, so there is no sampling difference. Dropout
draws differ between the CPU and CUDA generators, so the dropout test stays on the device: with
dropout on, every pass of a step must see the same mask (``replay_rng``), and the next step a new
one.

``SASSHA_CUDA_TEST_DEVICE=cpu`` runs the file on the CPU against itself: it checks the tests' own
code on a machine without a GPU, and says nothing about CUDA.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from torch import nn

from sassha_dist import Sassha
from sassha_dist import state_keys as keys

DEVICE = torch.device(os.environ.get("SASSHA_CUDA_TEST_DEVICE", "cuda"))
DEVICE_RTOL = 1e-9  # see the module docstring

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m cuda)"
    ),
]

STEPS = 6
KW = {"lr": 0.05, "rho": 0.05, "lazy_hessian": 2, "seed": 3}


def _model(dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(8, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1)
        ).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(32, 8, generator=gen, dtype=torch.float64),
            torch.randn(32, 1, generator=gen, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def _train(device: torch.device, model: nn.Module | None = None, steps: int = STEPS, **options):
    model = copy.deepcopy(model if model is not None else _model()).to(device)
    opt = Sassha(model.parameters(), **{**KW, **options})
    losses = []
    for x, y in _batches()[:steps]:
        x, y = x.to(device), y.to(device)
        losses.append(float(opt.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))))
    return model, opt, losses


def _update(model: nn.Module) -> torch.Tensor:
    initial = _model()
    return torch.cat(
        [(p.detach().cpu() - q.detach()).flatten() for p, q in zip(model.parameters(), initial.parameters())]
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("perturbation", ["gradient", "momentum"])
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_trajectory_matches_the_cpu(method, perturbation):
    cpu_model, _, cpu_losses = _train(torch.device("cpu"), hessian_method=method, perturbation=perturbation)
    dev_model, opt, dev_losses = _train(DEVICE, hessian_method=method, perturbation=perturbation)
    assert all(s[keys.MOMENTUM].device.type == DEVICE.type for s in opt.state.values())
    assert _rel(_update(dev_model), _update(cpu_model)) < DEVICE_RTOL
    assert dev_losses == pytest.approx(cpu_losses, rel=DEVICE_RTOL)
    assert opt.skipped_steps == 0


def test_foreach_and_for_loop_kernels_agree():
    """The foreach path (the default on CUDA) and the for-loop path compute the same update."""
    foreach, _, _ = _train(DEVICE, foreach=True)
    loop, _, _ = _train(DEVICE, foreach=False)
    assert _rel(_update(foreach), _update(loop)) < DEVICE_RTOL


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_dropout_masks_replay_on_the_device(method):
    """Every pass of a step (at theta, theta + eps, the finite-difference points) sees the same
    dropout mask on the device's generator, and the next step draws a new one."""
    model = _model(dropout=0.5).to(DEVICE)
    masks: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda _m, _i, out: masks.append((out == 0).cpu()))
    opt = Sassha(model.parameters(), **KW, hessian_method=method)
    per_step = []
    for x, y in _batches()[:3]:
        x, y = x.to(DEVICE), y.to(DEVICE)
        masks.clear()
        opt.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
        per_step.append(list(masks))
    assert [len(m) for m in per_step] == ([4, 2, 4] if method == "finite_difference" else [2, 2, 2])
    for step_masks in per_step:
        assert all(torch.equal(m, step_masks[0]) for m in step_masks)
    assert not torch.equal(per_step[0][0], per_step[1][0])


def test_state_dict_round_trip_resumes_bit_for_bit():
    """Save after 3 steps (to bytes, as torch.save to a file), load into a fresh optimizer on the
    device, train 3 more: the weights of the uninterrupted 6-step run, bit for bit."""
    full, _, _ = _train(DEVICE, hessian_method="finite_difference")
    half, opt, _ = _train(DEVICE, hessian_method="finite_difference", steps=3)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location=DEVICE, weights_only=True)
    resumed = _model().to(DEVICE)
    resumed.load_state_dict(saved["model"])
    opt = Sassha(resumed.parameters(), **KW, hessian_method="finite_difference")
    opt.load_state_dict(saved["optimizer"])
    for x, y in _batches()[3:]:
        x, y = x.to(DEVICE), y.to(DEVICE)
        opt.step(lambda x=x, y=y: nn.functional.mse_loss(resumed(x), y))
    for p, q in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(p, q)


def test_bf16_autocast_with_finite_differences_trains():
    """bf16 autocast (fp32 parameters) with the bf16 finite-difference step: no skipped step, and
    the loss falls over 40 steps on a fixed batch. Checked against the fp32 run's final loss
    within 5% (bf16 carries 8 bits of mantissa; measured with the CPU's bf16 autocast: 1.5%)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 8, generator=gen).to(DEVICE)
    y = torch.randn(64, 1, generator=gen).to(DEVICE)

    def run(autocast: bool) -> tuple[float, float, Sassha]:
        model = _model().float().to(DEVICE)
        opt = Sassha(model.parameters(), **KW, hessian_method="finite_difference", fd_step=2.5e-2)

        def closure():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
                return nn.functional.mse_loss(model(x).float(), y)

        first = float(opt.step(closure))
        for _ in range(39):
            last = float(opt.step(closure))
        return first, last, opt

    first, last, opt = run(autocast=True)
    _, reference, _ = run(autocast=False)
    assert opt.skipped_steps == 0
    assert last < first
    assert last == pytest.approx(reference, rel=0.05)
