"""The step's one sequence of phases under a pass runner whose update reads the last pass (the ZeRO order).

``Sassha.run_passes`` runs the finite differences before the perturbed pass when the runner's
update reads the last pass's gradient where the engine keeps it (DeepSpeed's buffers). This
checks that order on one device against the autograd order, with a runner that keeps the last
pass's gradient in ``p.grad`` and restores the point exactly after each probe, as the ZeRO
runner does.

Tolerances: the central scheme with one probe visits the same points in the same arithmetic in
both orders, so the runs agree bit for bit. The forward scheme subtracts ``sum_s z_s * g(w)``
once at the end instead of ``g(w)`` per probe: a different rounding order, so fp64 runs agree to
``rtol=1e-12`` (about 10^4 ulps of float64, far below any change in behaviour).
"""

from __future__ import annotations

import pytest
import torch

from sassha_dist import Sassha
from sassha_dist.closures import negated
from sassha_dist.distributed import FullyShard, SingleProcess
from sassha_dist.distributed.deepspeed import DeepSpeedZero
from sassha_dist.hessian.finite_difference import DifferencePasses
from sassha_dist.passes import PassRunner
from tests.helpers import assert_same, make_batches, make_mlp, mse, snapshot

STEPS = 6


class _LastPassKept(PassRunner):
    """The ZeRO order on one device: the last pass's gradient stays in ``p.grad`` for the update."""

    update_reads_last_pass = True

    def __init__(self) -> None:
        self.moves = 0

    def last_pass(self, optimizer, closures):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        loss = self.accumulate(optimizer, closures, params)
        return loss, [p.grad for p in params]

    def difference_passes(self, optimizer, step, closures, gradient_at_point):
        assert gradient_at_point is None  # it comes from the last pass
        return _CopyingDifferences(self, optimizer, step, closures)

    def parameters_moved(self) -> None:
        self.moves += 1

    def step_started(self, optimizer, step) -> None:
        for p in step.params:
            p.grad = None  # as the ZeRO runner frees the gradient at theta


class _CopyingDifferences(DifferencePasses):
    """Central and forward differences that restore the point exactly after each probe."""

    def __init__(self, runner, optimizer, step, closures) -> None:
        self.runner, self.optimizer, self.step, self.closures = runner, optimizer, step, closures
        self.point = [p.detach().clone() for p in step.locals]
        self.probe_sum = []

    def _accumulate(self, closures) -> None:
        with torch.enable_grad():
            self.runner.accumulate(self.optimizer, closures, self.step.params)

    def _taken(self):
        return self.runner.take_gradients(self.optimizer, self.step.params, self.step.locals)

    def central(self, signs, h):
        locals_ = self.step.locals
        torch._foreach_add_(locals_, signs, alpha=h)
        self._accumulate(self.closures)
        torch._foreach_add_(locals_, signs, alpha=-2.0 * h)
        self._accumulate([negated(c) for c in self.closures])
        torch._foreach_copy_(locals_, self.point)
        return self._taken()

    def forward(self, signs, h):
        locals_ = self.step.locals
        torch._foreach_add_(locals_, signs, alpha=h)
        self._accumulate(self.closures)
        torch._foreach_copy_(locals_, self.point)
        if not self.probe_sum:
            self.probe_sum = [torch.zeros_like(p) for p in locals_]
        torch._foreach_add_(self.probe_sum, signs)
        return self._taken()


def _run(runner: PassRunner | None, **options):
    model = make_mlp((3, 6, 1))
    opt = Sassha(model.parameters(), lr=0.05, lazy_hessian=2, hessian_method="finite_difference", **options)
    losses = []
    for batch in make_batches(STEPS, in_dim=3):
        closure = lambda batch=batch: mse(model, batch)  # noqa: E731
        if runner is None:
            losses.append(opt.step(closure))
        else:
            losses.append(opt.run_passes(closure, runner))
            opt.update()
    return snapshot(model, opt), torch.stack(losses), opt


@pytest.mark.parametrize(
    "options",
    [{"rho": 0.05}, {"rho": 0.0}, {"perturbation": "momentum", "rho": 0.05}],
    ids=["two_pass", "one_pass", "momentum"],
)
def test_last_pass_order_matches_the_autograd_order_bit_for_bit(options):
    expected, expected_losses, _ = _run(None, **options)
    runner = _LastPassKept()
    actual, losses, opt = _run(runner, **options)
    assert_same(expected, actual)
    assert torch.equal(expected_losses, losses)
    assert opt.counters["hessian_refreshes"] == STEPS // 2
    assert runner.moves > 0  # the runner heard of every move (ZeRO resyncs the model's copy)


def test_last_pass_order_completes_forward_differences():
    expected, expected_losses, _ = _run(None, rho=0.05, fd_scheme="forward", n_samples=2)
    actual, losses, _ = _run(_LastPassKept(), rho=0.05, fd_scheme="forward", n_samples=2)
    assert torch.equal(expected_losses[:1], losses[:1])
    for want, got in zip(expected["params"], actual["params"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


def test_a_failing_pass_cancels_and_tells_the_runner():
    class _Recording(_LastPassKept):
        def step_cancelled(self, moved: bool) -> None:
            self.cancelled = moved

    model = make_mlp((3, 6, 1))
    opt = Sassha(model.parameters(), lr=0.05, hessian_method="finite_difference")
    before = snapshot(model)
    batch = make_batches(1, in_dim=3)[0]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:  # inside the finite differences, after the perturbation moved theta
            raise RuntimeError("boom")
        return mse(model, batch)

    runner = _Recording()
    with pytest.raises(RuntimeError, match="boom"):
        opt.run_passes(closure, runner)
    assert runner.cancelled is True and not opt.in_step
    assert_same(before, snapshot(model))


def test_default_capabilities_are_the_class_defaults():
    """The Trainer's start-up checks use these before any strategy exists."""
    assert FullyShard.default_capabilities().exact_hessian is False  # needs the module, on an instance
    assert SingleProcess.default_capabilities().exact_hessian is True
    zero = DeepSpeedZero.default_capabilities()
    assert zero == DeepSpeedZero().capabilities and zero.global_probes_only
