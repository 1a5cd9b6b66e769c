r"""The SASSHA optimizer.

SASSHA (Shin et al., ICML 2025, arXiv:2502.18153) takes a sharpness-aware
ascent step, then preconditions the gradient found there with the square root
of an EMA of the absolute Hessian diagonal, estimated by Hutchinson's method
at the perturbed point and refreshed every ``lazy_hessian`` steps:

.. math::
    \begin{aligned}
    &\epsilon_t = \rho\, g_t / (\lVert g_t \rVert_2 + \epsilon_\rho),
        \quad g_t = \nabla f(\theta_t) \quad \text{(one norm over all groups)}\\
    &\tilde g_t = \nabla f(\theta_t + \epsilon_t) \\
    &\text{every } k \text{ steps: } \tilde H = \tfrac1S \textstyle\sum_s z_s \odot
        \nabla^2 f(\theta_t + \epsilon_t)\, z_s, \quad
        D \leftarrow \beta_2 D + (1-\beta_2)\,|\tilde H| \\
    &m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\tilde g_t \\
    &\theta_{t+1} = \theta_t - \eta\, \frac{m_t / (1-\beta_1^t)}{(D / c_2)^{p} + \epsilon}
        - \eta\lambda\theta_t
    \end{aligned}

The update is applied to the exact saved :math:`\theta_t`, never to
:math:`(\theta_t + \epsilon_t) - \epsilon_t`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from sassha_dist import state_keys as keys
from sassha_dist.closures import Closure, all_finite_flag, as_closures, evaluate_closure
from sassha_dist.distributed.resolve import resolve_strategy
from sassha_dist.distributed.strategy import ProbeSegment, Strategy
from sassha_dist.functional import (
    UpdateHyperparameters,
    apply_perturbation,
    perturbation_sq_norm,
    sassha_update,
    sq_norm,
    state_dtype,
    update_hessian_ema,
)
from sassha_dist.hessian.exact import ExactProducts, exact_products
from sassha_dist.hessian.finite_difference import difference_weight, hutchinson_by_differences
from sassha_dist.hessian.hvp import (
    UNDERFLOW_SAFE_EPS,
    UNDERFLOW_WARNING_FRACTION,
    curvature_underflow,
    default_fd_step,
    finite_difference_step,
)
from sassha_dist.hessian.probes import segment_probes
from sassha_dist.options import (
    BIAS_CORRECTION_HESSIAN_REFRESHES,
    EPS_AFTER_POWER,
    FD_CENTRAL,
    HESSIAN_AUTO,
    HESSIAN_EXACT,
    HESSIAN_FINITE_DIFFERENCE,
    NONFINITE_RAISE,
    NONFINITE_SKIP,
    PERTURB_GRADIENT,
    PERTURB_MOMENTUM,
    PROBES_AUTO,
    PROBES_GLOBAL,
    PROBES_PER_RANK,
    RENAMED_CHOICES,
    WEIGHT_DECAY_LR_SCALED,
    BiasCorrection,
    EpsPlacement,
    FdScheme,
    HessianMethod,
    OnNonfinite,
    Perturbation,
    ProbeMode,
    SasshaOptions,
    WeightDecayMode,
    check_rho,
    current_choice,
    resolve_options,
    validate_group,
)
from sassha_dist.passes import AUTOGRAD_PASSES, PassRunner
from sassha_dist.presets import AUTHORS_PRESET, RECIPE_IMAGE, authors_options
from sassha_dist.rng import RngReplay
from sassha_dist.state_dict import (
    check_loadable,
    counters_from_state,
    loaded_entry,
    saved_ids,
    split_counters,
    with_counters,
)
from sassha_dist.step import StepReport, StepState

__all__ = ["AUTHORS_PRESET", "Closure", "Sassha", "SasshaOptions", "StepReport", "StepState"]

logger = logging.getLogger(__name__)


@dataclass
class _MomentumAscent:
    """The momentum ascent of a step (``perturbation="momentum"``): what moved, and its exact w."""

    params: list[torch.Tensor]
    locals: list[torch.Tensor]
    theta: list[torch.Tensor]


@dataclass
class _FusedEstimate:
    """An exact estimate from a one-pass step's gradient pass, for the step ``perturb`` starts."""

    params: list[torch.Tensor]
    estimates: list[torch.Tensor]


class Sassha(Optimizer):
    r"""Sharpness-aware adaptive second-order optimizer with a stable Hessian approximation.

    Args:
        params: parameters or parameter groups. Per group: ``lr``, ``betas``,
            ``weight_decay``, ``rho``, ``eps``.
        lr: learning rate :math:`\eta` (default 0.15, the authors').
        betas: :math:`(\beta_1, \beta_2)` for the gradient and Hessian EMAs.
        weight_decay: decoupled decay :math:`\lambda` (see ``weight_decay_mode``).
        rho: perturbation radius :math:`\rho`, or a callable of the 1-based step (per group,
            checked on every call). A step on which every group's ``rho`` is 0 runs one pass:
            :math:`\theta + \epsilon = \theta`, so the gradient pass is also the perturbed one.
        lazy_hessian: refresh the Hessian every ``k`` steps (also on any step in
            which a parameter without a Hessian estimate appears).
        n_samples: Rademacher probes per refresh.
        hessian_power: :math:`p` in :math:`(D/c_2)^p`: a float in (0, 1] or a callable of the step.
        eps: added to the preconditioner (``eps_placement`` says where).
        perturb_eps: :math:`\epsilon_\rho` in :math:`\rho / (\lVert g\rVert + \epsilon_\rho)`.
        adaptive: ASAM-style perturbation (norm of :math:`|\theta| g`, :math:`\epsilon \propto \theta^2 g`).
        local_perturbation: each data-parallel rank perturbs with its own,
            unreduced gradient (the authors' DDP code) instead of the global one.
            Saves the first pass's all-reduce; needs whole parameters (DDP).
        seed: seed of the counter-based probe stream.
        hessian_method: ``"exact"`` (double backward), ``"finite_difference"``
            (first-order passes only) or ``"auto"`` (exact where the engine allows it).
        fd_scheme: ``"central"`` (two passes, default) or ``"forward"`` (one pass).
        fd_step: relative finite-difference step :math:`h_0`; ``None`` picks 1e-3
            for fp32/fp64 parameters and 2.5e-2 for bf16/fp16 ones. Under bf16
            autocast with fp32 parameters pass 2.5e-2.
        eps_placement: ``"after_power"`` (default, :math:`(D/c_2)^p + \epsilon`, as
            the authors' code) or ``"inside_power"`` (:math:`(D/c_2 + \epsilon)^p`).
        bias_correction: of :math:`D`: ``"hessian_refreshes"`` (default,
            :math:`c_2 = 1-\beta_2^n` with :math:`n` refreshes; its old name ``"hessian_updates"``
            is accepted with a ``FutureWarning`` for one release), ``"global_step"``
            (the authors': :math:`D^p` divided by :math:`(1-\beta_2^{t_r})^{p_r}`, with
            :math:`t_r` the parameter's step at its last refresh and :math:`p_r` the power
            then, held until the next refresh) or ``"none"``.
        momentum_bias_correction: divide :math:`m` by :math:`1-\beta_1^t` (default); the
            authors' GPT-2 code does not.
        weight_decay_mode: ``"lr_scaled"`` (:math:`\theta \mathrel{-}= \eta\lambda\theta`)
            or ``"lr_independent"`` (:math:`\theta \mathrel{-}= \lambda\theta`).
        probe_mode: ``"per_rank"`` (each data-parallel rank its own probe),
            ``"global"`` (one probe for the whole model, shard-independent) or ``"auto"``.
        on_nonfinite: ``"skip"`` a step with a non-finite loss, gradient or
            Hessian estimate (parameters and state untouched, counted in
            ``skipped_steps``), or ``"raise"`` ``FloatingPointError`` after undoing it.
        foreach: use the foreach kernels (default: on CUDA/XPU, and on CPU for tensors of at most
            16,384 elements on average, where per-tensor dispatch dominates).
        replay_rng: replay the random-number state before every pass of a step (default), so
            dropout draws the same masks at :math:`\theta`, :math:`\theta+\epsilon` and the
            finite-difference points (see :mod:`sassha_dist.rng`). ``False`` draws new masks per
            pass, as the authors' code does: harmless for gradients, fatal for finite differences.
        perturbation: the ascent direction. ``"gradient"`` (default, SASSHA): the gradient at
            :math:`\theta`, which costs a pass of its own. ``"momentum"`` (M-SASSHA, the authors'
            ``msassha.py``): :math:`\tilde w = w - \rho\, m / (\lVert m\rVert + \epsilon_\rho)`
            with the momentum of the previous steps, so the step's only pass is at
            :math:`\tilde w` (gradient and Hessian), and the update applies to the exact saved
            :math:`w`. The parameters hold :math:`w` between steps. Not with ``adaptive`` or
            ``local_perturbation``.
        strategy: the engine strategy; detected from ``params`` when omitted.

    One call per training step: ``optimizer.step(closure)``. The closure must
    evaluate the model's loss at the *current* parameters on the step's batch
    and return it as a scalar tensor with its graph. It must not call
    ``backward``, ``zero_grad`` or ``step``, and must not change parameters or
    draw a new batch: it is called 2 times per step (the exact Hessian is fused
    into the second), 1 time on steps where every group's ``rho`` is 0, plus 1 or 2
    per probe on finite-difference Hessian steps. Every call of a step sees the same
    random numbers (``replay_rng``). Pass a list of closures for gradient accumulation, one per
    micro-batch, each returning its share of the loss. ``step`` zeroes the
    gradients itself and leaves the perturbed gradient in ``p.grad``.

    Pass-by-pass, for loops that must control each pass (``step`` is exactly this)::

        loss = opt.gradient_pass(closure)  # zero grads, grad at theta
        opt.perturb(loss)                  # theta -> theta + eps (theta saved exactly)
        opt.perturbed_pass(closure)        # grad at theta + eps (+ exact HVPs on Hessian steps)
        opt.hessian_pass(closure)          # finite-difference HVPs on Hessian steps, else no-op
        opt.update()                       # exact restore, then the update (or a skip)

    ``gradient_pass`` may be replaced by any code that leaves the gradient at
    theta in ``p.grad`` (for example an engine's own backward); ``cancel()``
    undoes a started step.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        rho: float = 0.05,
        *,
        lazy_hessian: int = 10,
        n_samples: int = 1,
        hessian_power: float | Callable[[int], float] = 0.5,
        eps: float = 1e-4,
        perturb_eps: float = 1e-12,
        adaptive: bool = False,
        local_perturbation: bool = False,
        seed: int = 0,
        hessian_method: HessianMethod = HESSIAN_AUTO,
        fd_scheme: FdScheme = FD_CENTRAL,
        fd_step: float | None = None,
        eps_placement: EpsPlacement = EPS_AFTER_POWER,
        bias_correction: BiasCorrection = BIAS_CORRECTION_HESSIAN_REFRESHES,
        weight_decay_mode: WeightDecayMode = WEIGHT_DECAY_LR_SCALED,
        probe_mode: ProbeMode = PROBES_AUTO,
        on_nonfinite: OnNonfinite = NONFINITE_SKIP,
        foreach: bool | None = None,
        momentum_bias_correction: bool = True,
        replay_rng: bool = True,
        perturbation: Perturbation = PERTURB_GRADIENT,
        strategy: Strategy | None = None,
    ) -> None:
        options = SasshaOptions(
            lazy_hessian=lazy_hessian,
            n_samples=n_samples,
            hessian_power=hessian_power,
            perturb_eps=perturb_eps,
            adaptive=adaptive,
            local_perturbation=local_perturbation,
            seed=seed,
            hessian_method=hessian_method,
            fd_scheme=fd_scheme,
            fd_step=fd_step,
            eps_placement=eps_placement,
            bias_correction=bias_correction,
            weight_decay_mode=weight_decay_mode,
            probe_mode=probe_mode,
            on_nonfinite=on_nonfinite,
            foreach=foreach,
            momentum_bias_correction=momentum_bias_correction,
            replay_rng=replay_rng,
            perturbation=perturbation,
        )
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "rho": rho, "eps": eps}
        validate_group(defaults)
        super().__init__(params, defaults)
        self.options = options
        self.use_strategy(strategy if strategy is not None else resolve_strategy(self._all_params()))
        self.counters = {keys.GLOBAL_STEP: 0, keys.HESSIAN_REFRESHES: 0, keys.SKIPPED_STEPS: 0}
        self.last_report = StepReport()
        self._pending: StepState | None = None
        self._fused: _FusedEstimate | None = None
        self._ascent: _MomentumAscent | None = None
        self._rng_replay: RngReplay | None = None

    def use_strategy(self, strategy: Strategy) -> None:
        """Run on ``strategy``: check the options against it and resolve the ``"auto"`` choices.

        Called at construction; call it again if an engine replaced the parameters with another
        kind after construction (before any state exists), as FSDP2's ``prepare`` does.
        """
        resolved = resolve_options(self.options, strategy.capabilities)
        self.strategy = strategy
        self.hessian_method = resolved.hessian_method
        self.probe_mode = resolved.probe_mode

    @classmethod
    def authors(
        cls,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        recipe: str = RECIPE_IMAGE,
        **overrides: Any,
    ) -> Sassha:
        """The authors' optimizer for ``recipe``, with ``overrides`` on top (:mod:`sassha_dist.presets`).

        ``"image"`` (default, :data:`AUTHORS_PRESET`): their image-classification optimizer.
        ``"lm"``: their GPT-2 recipe, with ``rho`` 0 and Hessian power 1 during the warm-ups
        (``rho_warmup_iters`` / ``hessian_warmup_iters``, default 2000), then 0.02 and 0.8.
        ``"momentum"``: their M-SASSHA (``perturbation="momentum"``, one pass per step): lr 0.15,
        rho 0.3, weight decay 1e-2, Hessian power 1.
        Gradient clipping (1.0 in their GPT-2 runs, of the perturbed gradient) stays the
        training loop's job: the Trainer's ``max_grad_norm`` and ``run_clm.py`` do it.
        """
        return cls(params, **authors_options(recipe, **overrides))

    # -- construction and persistence -------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            validate_group(self.param_groups[-1])
            _validate_params(self.param_groups[-1]["params"])
        except ValueError:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(options=self.options, strategy=self.strategy, counters=self.counters)
        state.update(hessian_method=self.hessian_method, probe_mode=self.probe_mode)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        options = self.__dict__.setdefault("options", SasshaOptions())
        # An optimizer pickled by 0.1.0 may hold a choice under its old name (RENAMED_CHOICES).
        renamed = {name: current_choice(name, getattr(options, name)) for name in RENAMED_CHOICES}
        if any(getattr(options, name) != value for name, value in renamed.items()):
            self.options = dataclasses.replace(options, **renamed)
        if "strategy" not in self.__dict__:  # not setdefault: resolving may raise for a kept strategy
            self.__dict__["strategy"] = resolve_strategy(self._all_params())
        self.__dict__.setdefault(
            "counters", {keys.GLOBAL_STEP: 0, keys.HESSIAN_REFRESHES: 0, keys.SKIPPED_STEPS: 0}
        )
        exact = self.strategy.prefers_exact_hessian
        self.__dict__.setdefault("hessian_method", HESSIAN_EXACT if exact else HESSIAN_FINITE_DIFFERENCE)
        self.__dict__.setdefault("probe_mode", PROBES_PER_RANK if exact else PROBES_GLOBAL)
        self.__dict__.setdefault("last_report", StepReport())
        self.__dict__["_pending"] = None
        self.__dict__["_fused"] = None
        self.__dict__["_ascent"] = None
        self.__dict__["_rng_replay"] = None

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the optimizer-wide counters (:mod:`sassha_dist.state_dict`)."""
        if self._pending is not None:
            raise RuntimeError(
                "state_dict() inside a step (between perturb() and update()); save after update()."
            )
        return with_counters(super().state_dict(), self.counters)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a Sassha state dict; ``m`` and ``D`` keep their fp32 precision for low-precision params.

        Older formats load too: missing counters and frozen corrections are derived
        (:mod:`sassha_dist.state_dict`). A dict of another optimizer or model is refused first.
        """
        if self._pending is not None:
            raise RuntimeError("load_state_dict() inside a step (between perturb() and update()).")
        state_dict, counters = split_counters(state_dict)
        params = self._all_params()
        check_loadable(state_dict, params)
        super().load_state_dict(state_dict)
        saved_state = state_dict.get("state", {})
        beta2_of = {id(p): g["betas"][1] for g in self.param_groups for p in g["params"]}
        for saved_id, param in zip(saved_ids(state_dict), params, strict=False):
            saved = saved_state.get(saved_id)
            if saved is not None:
                self.state[param].update(
                    loaded_entry(
                        saved, param, beta2_of[id(param)], self.options.lazy_hessian, self.options.power_at
                    )
                )
        if counters is None:
            counters = counters_from_state(self.state.values())
        self.counters = {k: int(counters[k]) for k in keys.COUNTER_NAMES}

    # -- the one-call step ----------------------------------------------------------------

    def step(self, closure: Closure | Sequence[Closure] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One SASSHA step; returns the loss at the pre-step parameters (detached).

        ``step()`` without a closure is accepted only as torch's state initialisation
        (:meth:`is_state_initialisation`): it creates the zero state and updates nothing.
        """
        if closure is None and not self.in_step and self.is_state_initialisation():
            for p in self._trainable_params():
                self._ensure_state(p)
            return None
        loss = self.run_passes(closure)
        self.update()
        return loss

    def is_state_initialisation(self) -> bool:
        """Whether a closure-less ``step()`` is torch's state initialisation.

        ``torch.distributed.checkpoint.state_dict``'s ``get/set_optimizer_state_dict`` create the
        state of an optimizer that has none by setting all-zero gradients and ``lr = 0`` and
        calling ``step()``: no state yet, every lr 0, every trainable parameter's gradient zero.
        """
        if self.state or any(float(group["lr"]) != 0.0 for group in self.param_groups):
            return False
        for p in self._trainable_params():
            grad = p.grad
            if grad is None:
                return False
            local = self.strategy.local(grad)
            if local.numel() and bool(local.any()):
                return False
        return True

    def run_passes(
        self, closure: Closure | Sequence[Closure] | None, runner: PassRunner = AUTOGRAD_PASSES
    ) -> torch.Tensor:
        """Every pass of a step, in order; the step is cancelled (theta restored) if one fails.

        Leaves the parameters at theta + eps and the perturbed gradient in ``p.grad`` for
        :meth:`update`: a loop may clip that gradient in between (as the Trainer does). Returns
        the loss at theta. ``runner`` runs the backward passes (:mod:`sassha_dist.passes`); one
        whose update reads the last pass's gradient from the engine
        (``update_reads_last_pass``, the ZeRO driver's) gets the finite differences before the
        perturbed pass.
        """
        closures = as_closures(closure)
        try:
            loss = self.gradient_pass(closures, runner)
            self.perturb(loss, runner)
            if runner.update_reads_last_pass:
                self.hessian_pass(closures, runner)
            self.perturbed_pass(closures, runner)
            if not runner.update_reads_last_pass:
                self.hessian_pass(closures, runner)
        except BaseException:
            moved = self.in_step
            self.cancel()
            runner.step_cancelled(moved)
            raise
        return self._pending.report.loss if loss is None else loss

    # -- the passes -----------------------------------------------------------------------

    def rho_at(self, group: dict[str, Any], step: int) -> float:
        """``group``'s radius on (1-based) ``step``; a schedule is checked on every call."""
        rho = group["rho"]
        return check_rho(rho(step), f"rho({step})") if callable(rho) else float(rho)

    def one_pass_due(self) -> bool:
        """Whether the next step runs one pass: ``perturbation="momentum"``, or ``rho = 0`` in every group.

        With :math:`\\rho = 0`, :math:`\\theta + \\epsilon = \\theta`: the gradient at
        :math:`\\theta` is the perturbed gradient. The momentum ascent moves before the pass
        (:meth:`ascend`), so its one pass is the perturbed one. On exact-Hessian steps the
        products are fused into that one pass.
        """
        if self.options.perturbation == PERTURB_MOMENTUM:
            return True
        step = self.counters[keys.GLOBAL_STEP] + 1
        # Every group counts, empty or not: ZeRO-3 keeps its groups empty outside engine.step().
        return all(self.rho_at(group, step) == 0.0 for group in self.param_groups)

    def gradient_pass(
        self, closure: Closure | Sequence[Closure], runner: PassRunner = AUTOGRAD_PASSES
    ) -> torch.Tensor | None:
        """Zero the gradients and accumulate the gradient at the current parameters; returns the loss.

        On a one-pass step (:meth:`one_pass_due`) that is due an exact Hessian, the
        Hessian-vector products come from this pass's graph. With ``perturbation="momentum"`` it
        first moves to :math:`\\tilde w` (:meth:`ascend`): the gradient is the perturbed one.
        A one-pass step under a runner whose update reads the last pass (ZeRO) takes its pass in
        :meth:`perturbed_pass`: this runs no pass and returns ``None``.
        """
        if self._pending is not None or self._ascent is not None:
            raise RuntimeError("gradient_pass() inside a step: call update() or cancel() first.")
        self.zero_grad(set_to_none=True)
        self._fused = None
        closures = as_closures(closure)
        params = self._trainable_params()
        if self.options.perturbation == PERTURB_MOMENTUM:
            self.ascend(params)
            runner.parameters_moved()
        self._start_rng_replay()
        one_pass = self.one_pass_due()
        if one_pass and runner.update_reads_last_pass:
            return None
        if one_pass and self.hessian_method == HESSIAN_EXACT and self._hessian_due(params):
            loss, self._fused = self._fused_exact_pass(params, closures)
            return loss
        # The authors' local perturbation only concerns the ascent; a one-pass gradient is the update's.
        local = self.options.local_perturbation and not one_pass
        backward = self.strategy.local_backward if local else self.strategy.backward
        return runner.accumulate(self, closures, params, backward)

    @torch.no_grad()
    def perturb(self, loss: torch.Tensor | None = None, runner: PassRunner = AUTOGRAD_PASSES) -> None:
        """Move each parameter with a gradient to :math:`\\theta + \\epsilon`, saving :math:`\\theta` exactly.

        Reads the gradient at :math:`\\theta` from ``p.grad``; ``loss`` (optional)
        joins the finiteness check. On a one-pass step nothing moves, and :math:`\\theta` is
        saved only if finite differences will move it.
        """
        if self._pending is not None:
            raise RuntimeError("perturb() called twice: call update() or cancel() to finish the step first.")
        if self.options.perturbation == PERTURB_MOMENTUM and self._ascent is None:
            raise RuntimeError(
                "perturbation='momentum' takes the step's one pass at the perturbed point: call "
                "gradient_pass(closure) (or step(closure)), not a backward of your own, before perturb()."
            )
        one_pass = self.one_pass_due()
        # A one-pass step whose pass comes last has no gradient yet: every parameter takes part.
        later = one_pass and runner.update_reads_last_pass
        self.start_step(*self.members(every=later), loss, one_pass=one_pass, gradients=not later)
        runner.step_started(self, self._pending)
        if not one_pass:
            runner.parameters_moved()

    @torch.no_grad()
    def ascend(self, params: list[torch.Tensor]) -> None:
        r"""The momentum ascent (``perturbation="momentum"``): :math:`\tilde w = w - \nu m`, saving :math:`w`.

        :math:`\nu = \rho_{group} / (\lVert m\rVert_2 + \epsilon_\rho)`, one norm over every
        parameter of every group and rank, with :math:`m` after the previous step's update and
        :math:`\rho` the coming step's. A parameter without state (before its first update)
        does not move. ``params`` are the step's parameters (every one, under ZeRO); the next
        :meth:`start_step` takes the ascent over, and :meth:`update` or :meth:`cancel` put
        :math:`w` back exactly.
        """
        if self._ascent is not None or self._pending is not None:
            raise RuntimeError("ascend() inside a step: call update() or cancel() first.")
        local_params = [self.strategy.local(p) for p in params]
        ascent = _MomentumAscent(params, local_params, [p.detach().clone() for p in local_params])
        self._ascent = ascent
        moving = [i for i, p in enumerate(params) if keys.MOMENTUM in self.state.get(p, {})]
        if not moving:
            return
        momenta = [self.strategy.local(self.state[params[i]][keys.MOMENTUM]) for i in moving]
        norm = self.strategy.sum_scalar(sq_norm(momenta, foreach=self.options.foreach)).sqrt()
        step = self.counters[keys.GLOBAL_STEP] + 1
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        apply_perturbation(
            [local_params[i] for i in moving],
            momenta,
            [
                (-self.rho_at(group_of[id(params[i])], step) / (norm + self.options.perturb_eps)).to(
                    local_params[i].device
                )
                for i in moving
            ],
            adaptive=False,
            foreach=self.options.foreach,
        )

    def members(self, *, every: bool = False) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """The step's parameters (with a gradient, or ``every`` one), their ordinals and groups."""
        params, probe_indices, group_indices = [], [], []
        ordinal = 0
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if every or self.strategy.has_gradient(p):
                    if p.grad is not None and p.grad.is_sparse:
                        raise RuntimeError(
                            "Sassha does not support sparse gradients; build the layer with dense "
                            "gradients (for example nn.Embedding(..., sparse=False))."
                        )
                    params.append(p)
                    probe_indices.append(ordinal)
                    group_indices.append(group_index)
                ordinal += 1
        return params, probe_indices, group_indices

    def start_step(
        self,
        params: list[torch.Tensor],
        probe_indices: list[int],
        group_indices: list[int],
        loss: torch.Tensor | None,
        *,
        one_pass: bool,
        gradients: bool = True,
    ) -> None:
        """Begin the step over ``params``: the gradient norm, and the perturbation unless ``one_pass``.

        ``gradients=False``: no gradient at theta exists yet (a one-pass step whose pass comes last,
        under ZeRO); :meth:`perturbed_pass` then takes the norm and its check.
        """
        local_params = [self.strategy.local(p) for p in params]
        report = StepReport(loss=None if loss is None else loss.detach())
        hessian_due = self._hessian_due(params)
        pending = StepState(
            params, local_params, probe_indices, group_indices, [], hessian_due, report, one_pass=one_pass
        )
        if loss is not None:
            pending.checks.append(("loss", all_finite_flag(loss.detach())))
        fused, self._fused = self._fused, None
        if fused is not None and hessian_due:
            position = {id(p): i for i, p in enumerate(fused.params)}
            pending.estimates = [fused.estimates[position[id(p)]] for p in params]
            pending.checks.append(("Hessian estimate", self._all_finite(pending.estimates)))
        if params and gradients:
            grads = self._local_grads(params, local_params)
            grad_norm = self._record_gradient_norm(pending, grads)
            if not one_pass:
                step = self.counters[keys.GLOBAL_STEP] + 1
                denominator = grad_norm + self.options.perturb_eps
                group_scales = [self.rho_at(group, step) / denominator for group in self.param_groups]
                pending.theta = [p.detach().clone() for p in local_params]
                apply_perturbation(
                    local_params,
                    grads,
                    # on each parameter's device: a group may mix devices (the norm lives on the first's)
                    [group_scales[g].to(p.device) for g, p in zip(group_indices, local_params, strict=True)],
                    adaptive=self.options.adaptive,
                    foreach=self.options.foreach,
                )
        ascent, self._ascent = self._ascent, None
        if ascent is not None:  # the momentum ascent moved ascent.params: restore those to w
            pending.theta = ascent.theta
            if [id(p) for p in ascent.params] != [id(p) for p in params]:
                pending.moved = ascent.locals
        elif one_pass and hessian_due and self.hessian_method == HESSIAN_FINITE_DIFFERENCE:
            pending.theta = [p.detach().clone() for p in local_params]  # the passes move theta
        self._pending = pending

    def perturbed_pass(
        self, closure: Closure | Sequence[Closure], runner: PassRunner = AUTOGRAD_PASSES
    ) -> torch.Tensor:
        """The gradient at :math:`\\theta + \\epsilon` into ``p.grad``; on exact-Hessian steps also the HVPs.

        The exact Hutchinson estimate reuses this pass's graph: one forward,
        the gradient with ``create_graph=True``, then one double backward per probe.
        On a one-pass step the gradient pass already was this pass: nothing runs, unless
        an exact Hessian is due and the gradient came from elsewhere (then this pass adds it).
        Under a runner whose update reads the last pass (ZeRO) the gradient stays in the engine,
        and this pass also is a one-pass step's only pass.
        """
        pending = self._require_pending("perturbed_pass")
        closures = as_closures(closure)
        if runner.update_reads_last_pass:
            return self._last_pass(pending, closures, runner)
        exact_due = pending.hessian_due and self.hessian_method == HESSIAN_EXACT
        if pending.one_pass and not (exact_due and pending.estimates is None):
            pending.report.perturbed_loss = pending.report.loss
            return pending.report.loss
        self._start_rng_replay(fresh=False)
        self.zero_grad(set_to_none=True)
        if exact_due:
            loss = self._exact_hessian_pass(pending, closures)
        else:
            loss = runner.accumulate(self, closures, pending.params)
        pending.report.perturbed_loss = loss
        pending.checks.append(("perturbed loss", all_finite_flag(loss)))
        pending.checks.append(("perturbed gradient", self._gradsall_finite_flag(pending.params)))
        return loss

    @torch.no_grad()
    def hessian_pass(
        self, closure: Closure | Sequence[Closure], runner: PassRunner = AUTOGRAD_PASSES
    ) -> None:
        r"""Finite-difference Hutchinson estimate at :math:`w = \theta + \epsilon` on Hessian steps.

        Central: :math:`z \odot (g(w+hz) - g(w-hz)) / 2h`, two passes per probe;
        forward: :math:`z \odot (g(w+hz) - \tilde g) / h`, one pass per probe.
        :math:`h = h_0 \lVert w\rVert / \lVert z\rVert`, one scalar for the whole model.
        A no-op on other steps and with ``hessian_method="exact"``.

        Memory, besides the saved :math:`\theta` and the set-aside :math:`\tilde g`: one
        gradient-sized buffer, in which the difference forms and becomes the estimate in place,
        and the probe as int8 signs. With full-precision parameters :math:`w` is not copied: the
        passes move the parameters by :math:`+hz, -2hz, +hz`, so :math:`w - hz` and the final
        :math:`w` carry rounding of about one ulp of :math:`w`; and the second pass
        back-propagates the negated loss onto the first gradient, so the difference forms in the
        gradient buffer itself. Low-precision parameters, whose ulp is not small next to
        :math:`hz`, keep an exact copy of :math:`w` and take each gradient in the state dtype.
        """
        pending = self._require_pending("hessian_pass")
        if not (pending.hessian_due and self.hessian_method == HESSIAN_FINITE_DIFFERENCE):
            return
        closures = as_closures(closure)
        params, local_params = pending.params, pending.locals
        # g(w) is in p.grad now, unless the runner takes the perturbed pass after the differences.
        at_point_known = not runner.update_reads_last_pass
        if at_point_known:
            saved_grads = [p.grad for p in params]
            perturbed_grads = runner.take_gradients(self, params, local_params)
        point_norm, num_elements = self.strategy.norm_and_count(local_params, foreach=self.options.foreach)
        fd_step = self.options.fd_step
        if fd_step is None:
            fd_step = default_fd_step(runner.compute_dtype(params))
        h = finite_difference_step(fd_step, point_norm, num_elements)
        central = self.options.fd_scheme == FD_CENTRAL
        passes = runner.difference_passes(
            self, pending, closures, perturbed_grads if at_point_known else None
        )
        pending.estimates = hutchinson_by_differences(
            passes,
            lambda sample: self._probes(pending, sample, dtype=torch.int8),
            h=h,
            central=central,
            n_samples=self.options.n_samples,
        )
        runner.parameters_moved()
        if not at_point_known:
            if not central:
                pending.forward_correction = (
                    passes.probe_sum,
                    difference_weight(h, central=False, n_samples=self.options.n_samples),
                )
            return
        for p, g, perturbed in zip(params, saved_grads, perturbed_grads, strict=True):
            p.grad = g
            local = None if g is None else self.strategy.local(g)
            if local is not None and local.data_ptr() != perturbed.data_ptr():
                local.copy_(perturbed)  # an engine buffer the passes overwrote (owned_gradient)
        self._check_estimates(pending, perturbed_grads)

    def _last_pass(self, pending: StepState, closures: list[Closure], runner: PassRunner) -> torch.Tensor:
        """The step's last pass through ``runner`` (ZeRO): its gradient stays in the engine for the update.

        Completes forward differences with the gradient at the point, and checks the estimate.
        """
        loss, grads = runner.last_pass(self, closures)
        report = pending.report
        report.perturbed_loss = loss
        if pending.one_pass:  # this was the step's only pass
            report.loss = loss
            pending.checks.append(("loss", all_finite_flag(loss)))
            self._record_gradient_norm(pending, grads)
        else:
            pending.checks.append(("perturbed loss", all_finite_flag(loss)))
            pending.checks.append(("perturbed gradient", self._all_finite(grads)))
        if pending.forward_correction is not None:
            # Forward differences: sum_s z_s * (g(w + h z_s) - g(w)) / (h S), g(w) known only now.
            probe_sum, weight = pending.forward_correction
            pending.forward_correction = None
            for estimate, z_sum, grad in zip(pending.estimates, probe_sum, grads, strict=True):
                estimate.addcmul_(z_sum, grad, value=-weight)
        if pending.estimates is not None:
            self._check_estimates(pending, grads)
        return loss

    @torch.no_grad()
    def update(self) -> StepReport:
        """Restore :math:`\\theta` exactly, then update, or skip the step if anything was non-finite."""
        pending = self._require_pending("update")
        self._pending = None
        self._finish_rng_replay()
        # torch's LR schedulers warn about "lr_scheduler.step() before optimizer.step()" unless
        # this is set (their wrapper of step() sets it); update() ends a step as step() does.
        self._opt_called = True
        if pending.theta:
            torch._foreach_copy_(pending.restored, pending.theta)
            pending.theta = []  # free the copy before the update kernel's temporaries
        report = pending.report
        self.last_report = report
        bad = self._first_nonfinite(pending.checks)
        if bad is not None:
            self.counters[keys.SKIPPED_STEPS] += 1
            report.skipped, report.reason = True, f"non-finite {bad}"
            message = (
                f"Sassha skipped step {self.counters[keys.GLOBAL_STEP] + 1}: non-finite {bad}; "
                f"parameters and state are unchanged ({self.counters[keys.SKIPPED_STEPS]} skipped so far)."
            )
            if self.options.on_nonfinite == NONFINITE_RAISE:
                raise FloatingPointError(message)
            logger.warning(message)
            return report
        if not pending.params:
            return report
        global_step = self.counters[keys.GLOBAL_STEP] + 1
        self.apply_update(pending, global_step)
        if pending.hessian_due:
            self.warn_on_underflow(report)
            self.counters[keys.HESSIAN_REFRESHES] += 1
            report.hessian_refreshed = True
        self.counters[keys.GLOBAL_STEP] = global_step
        return report

    @torch.no_grad()
    def apply_update(self, step: StepState, global_step: int) -> None:
        """The update of ``step``'s parameters (already back at theta) as step ``global_step``.

        Folds the Hessian estimate into ``D`` on refresh steps, advances the per-parameter
        counters and runs the update kernel. The optimizer-wide counters are the caller's:
        :meth:`update` advances them, and the ZeRO driver once per training step while
        DeepSpeed calls this once per partition.
        """
        power = self.options.power_at(global_step)
        params = step.params
        for p in params:
            self._ensure_state(p)
        if step.hessian_due:
            estimates = step.estimates
            if estimates is None:
                raise RuntimeError(
                    "This is a Hessian step with hessian_method='finite_difference': call "
                    "hessian_pass(closure) before update()."
                )
            update_hessian_ema(
                [self.strategy.local(self.state[p][keys.HESSIAN_DIAG]) for p in params],
                estimates,
                [self.param_groups[g]["betas"][1] for g in step.group_indices],
                foreach=self.options.foreach,
            )
            del estimates
            step.estimates = None  # folded into D: free them before the update kernel
            for p in params:
                self.state[p][keys.HESSIAN_UPDATES] += 1
        local = self.strategy.local
        for group_index, group in enumerate(self.param_groups):
            members = [i for i, g in enumerate(step.group_indices) if g == group_index]
            if not members:
                continue
            states = [self.state[params[i]] for i in members]
            hyper = self._hyperparameters(group, power)
            for s in states:
                s[keys.STEP] += 1
                if step.hessian_due:
                    # The authors' correction of D, frozen until the next refresh ("global_step").
                    s[keys.HESSIAN_CORRECTION].fill_(1.0 - hyper.beta2 ** int(s[keys.STEP]))
                    s[keys.HESSIAN_CORRECTION_POWER].fill_(power)
            member_params = [params[i] for i in members]
            member_locals = [step.locals[i] for i in members]
            sassha_update(
                member_locals,
                self._local_grads(member_params, member_locals),
                [local(s[keys.MOMENTUM]) for s in states],
                [local(s[keys.HESSIAN_DIAG]) for s in states],
                [int(s[keys.STEP]) for s in states],
                [
                    hyper.hessian_correction(
                        int(s[keys.HESSIAN_UPDATES]),
                        float(s[keys.HESSIAN_CORRECTION]),
                        float(s[keys.HESSIAN_CORRECTION_POWER]),
                    )
                    for s in states
                ],
                hyper,
                foreach=self.options.foreach,
            )

    @torch.no_grad()
    def cancel(self) -> None:
        """Abandon a started step: restore :math:`\\theta` exactly, leave state untouched."""
        pending, self._pending = self._pending, None
        ascent, self._ascent = self._ascent, None
        self._fused = None
        self._finish_rng_replay()
        if pending is not None and pending.theta:
            torch._foreach_copy_(pending.restored, pending.theta)
        elif ascent is not None:
            torch._foreach_copy_(ascent.locals, ascent.theta)

    # -- diagnostics ----------------------------------------------------------------------

    def warn_on_underflow(self, report: StepReport) -> None:
        """Warn once if a refresh's finite-difference estimate underflowed on many coordinates (one sync)."""
        if report.hessian_underflow is None or self.__dict__.get("_underflow_warned", False):
            return
        if min(group["eps"] for group in self.param_groups) >= UNDERFLOW_SAFE_EPS:
            return  # the remedy is in place: those coordinates step by at most lr * m / eps
        fraction = float(report.hessian_underflow)
        if fraction <= UNDERFLOW_WARNING_FRACTION:
            return
        self._underflow_warned = True
        logger.warning(
            "Sassha: %.2f%% of this rank's Hessian-diagonal estimate is exactly 0 where the gradient is not: "
            "the finite difference underflowed in low precision (bf16/fp16 gradients). Those coordinates "
            "keep D = 0 and step by lr * m / eps, which can diverge. Raise eps (to eps=1e-2, "
            "--optim_args eps=1e-2 in the Trainer) or compute the passes in fp32.",
            100 * fraction,
        )

    @property
    def in_step(self) -> bool:
        """True from the ascent to ``update()`` / ``cancel()``: the parameters may be off theta."""
        return self._pending is not None or self._ascent is not None

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Hold the exact weights :math:`\\theta` in the parameters for the block (evaluate, save).

        Between steps the parameters already are :math:`\\theta` (under either ``perturbation``)
        and this does nothing. Inside a step (after the ascent, before ``update()``) it swaps
        :math:`\\theta` in and puts the perturbed point back afterwards, bit for bit.
        """
        pending, ascent = self._pending, self._ascent
        if pending is not None and pending.theta:
            moved, theta = pending.restored, pending.theta
        elif pending is None and ascent is not None:
            moved, theta = ascent.locals, ascent.theta
        else:
            yield
            return
        with torch.no_grad():
            point = [p.detach().clone() for p in moved]
            torch._foreach_copy_(moved, theta)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(moved, point)

    @property
    def current_step(self) -> StepState | None:
        """The started step's :class:`~sassha_dist.step.StepState` (``None`` outside a step)."""
        return self._pending

    @property
    def skipped_steps(self) -> int:
        return self.counters[keys.SKIPPED_STEPS]

    @torch.no_grad()
    def hessian_stats(self) -> dict[str, float]:
        """Mean and max of the bias-uncorrected ``D`` over this rank's state (one sync)."""
        diags = [
            self.strategy.local(s[keys.HESSIAN_DIAG]) for s in self.state.values() if keys.HESSIAN_DIAG in s
        ]
        if not diags:
            return {"hessian_mean": 0.0, "hessian_max": 0.0}
        total = sum(d.sum(dtype=torch.float64) for d in diags)
        count = sum(d.numel() for d in diags)
        peak = torch.stack([d.max() for d in diags if d.numel()]).max()
        return {"hessian_mean": float(total) / count, "hessian_max": float(peak)}

    # -- helpers --------------------------------------------------------------------------

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _trainable_params(self) -> list[torch.Tensor]:
        return [p for p in self._all_params() if p.requires_grad]

    def _require_pending(self, method: str) -> StepState:
        if self._pending is None:
            raise RuntimeError(f"{method}() outside a step: call perturb() first (or use step(closure)).")
        return self._pending

    def end_passes(self) -> None:
        """A driver ran the last pass of its step: leave the generators where one pass would."""
        self._finish_rng_replay()

    def detach_step(self) -> StepState:
        """Take the started step out of the optimizer, for a driver that completes it itself.

        The ZeRO driver does: DeepSpeed's ``engine.step()`` then calls :meth:`apply_update`
        per partition. Parameters stay where the passes left them; the caller restores theta.
        """
        step = self._require_pending("detach_step")
        self._pending = None
        return step

    def _start_rng_replay(self, *, fresh: bool = True) -> None:
        """Record (or, ``fresh=False``, keep recording) the random-number state of this step's passes."""
        if self.options.replay_rng and (fresh or self._rng_replay is None):
            self._rng_replay = RngReplay(self._trainable_params())

    def _finish_rng_replay(self) -> None:
        replay, self._rng_replay = self._rng_replay, None
        if replay is not None:
            replay.finish()

    def evaluate_in_step(self, closure: Closure, index: int) -> torch.Tensor:
        """Micro-batch ``index``'s loss, with this step's random numbers (``replay_rng``) replayed.

        For drivers that run the passes through an engine (the ZeRO driver): every closure
        call of a step goes through here, so dropout draws the same masks in every pass.
        """
        replay = self._rng_replay
        if replay is None:
            return evaluate_closure(closure)
        with replay.around(index):
            return evaluate_closure(closure)

    def _exact_products(
        self, params: list[torch.Tensor], probe_indices: list[int], closures: list[Closure]
    ) -> ExactProducts:
        """Gradient and exact Hutchinson estimate of ``params`` from one graph per micro-batch."""
        return exact_products(
            self.strategy,
            params,
            closures,
            n_samples=self.options.n_samples,
            evaluate=self.evaluate_in_step,
            probes=lambda inputs, sample: self._whole_probes(inputs, probe_indices, sample),
        )

    def _exact_hessian_pass(self, pending: StepState, closures: list[Closure]) -> torch.Tensor:
        """Perturbed gradient into ``p.grad`` and the exact estimate into ``pending``, in one pass."""
        loss, grads, estimates, _ = self._exact_products(pending.params, pending.probe_indices, closures)
        for p, g in zip(pending.params, grads, strict=True):
            p.grad = g
        pending.estimates = estimates
        pending.checks.append(("Hessian estimate", self._all_finite(estimates)))
        return loss

    def _fused_exact_pass(
        self, params: list[torch.Tensor], closures: list[Closure]
    ) -> tuple[torch.Tensor, _FusedEstimate]:
        """A one-pass step's gradient at theta with the exact estimate fused into it.

        A parameter takes part, as after an ordinary gradient pass, if some rank's graph
        reached it (one flag all-reduce): the others keep ``p.grad = None``.
        """
        ordinals = {id(p): i for i, p in enumerate(self._all_params())}
        loss, grads, estimates, used = self._exact_products(
            params, [ordinals[id(p)] for p in params], closures
        )
        # host flags: all_true moves them to the communication device only where there is a collective
        unused = torch.tensor([not u for u in used])
        takes_part = [not flag for flag in self.strategy.all_true(unused).tolist()]
        for p, g, part in zip(params, grads, takes_part, strict=True):
            p.grad = g if part else None
        members = [i for i, part in enumerate(takes_part) if part]
        return loss, _FusedEstimate([params[i] for i in members], [estimates[i] for i in members])

    def _hessian_due(self, params: list[torch.Tensor]) -> bool:
        """Whether a step over ``params`` refreshes the Hessian: every k steps, and for new parameters."""
        return bool(params) and (
            self.counters[keys.GLOBAL_STEP] % self.options.lazy_hessian == 0
            or any(int(self.state.get(p, {}).get(keys.HESSIAN_UPDATES, 0)) == 0 for p in params)
        )

    def _probe_rank(self) -> int:
        return self.strategy.rank if self.probe_mode == PROBES_PER_RANK else 0

    def draw_probes(
        self,
        likes: Sequence[torch.Tensor],
        segment_lists: Sequence[list[ProbeSegment]],
        sample: int,
        dtype: torch.dtype | None = None,
    ) -> list[torch.Tensor]:
        """This refresh's probe ``sample`` for each of ``likes``, from its segments (zero elsewhere).

        In ``dtype`` (default: each tensor's own); ``torch.int8`` signs take a quarter of fp32's
        memory. See :func:`sassha_dist.hessian.probes.segment_probes`.
        """
        return segment_probes(
            likes,
            segment_lists,
            seed=self.options.seed,
            refresh=self.counters[keys.HESSIAN_REFRESHES],
            sample=sample,
            rank=self._probe_rank(),
            dtype=dtype,
        )

    def _probes(
        self, pending: StepState, sample: int, dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        """Probe ``sample`` for each local shard, from the elements of the full parameters it holds."""
        segments = [
            self.strategy.probe_segments(p, index)
            for p, index in zip(pending.params, pending.probe_indices, strict=True)
        ]
        return self.draw_probes(pending.locals, segments, sample, dtype)

    def _whole_probes(
        self, tensors: list[torch.Tensor], indices: list[int], sample: int
    ) -> list[torch.Tensor]:
        """Probe ``sample`` for whole (unsharded) parameter tensors."""
        segments = [[ProbeSegment(0, t.numel(), index, 0)] for t, index in zip(tensors, indices, strict=True)]
        return self.draw_probes(tensors, segments, sample)

    def _local_grads(
        self, params: list[torch.Tensor], local_params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Local views of the gradients of ``params`` (zeros where a parameter has none)."""
        return [
            torch.zeros_like(local) if p.grad is None else self.strategy.local(p.grad)
            for p, local in zip(params, local_params, strict=True)
        ]

    def _record_gradient_norm(self, pending: StepState, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global norm of the gradient at theta (``adaptive``: of ``|theta| g``), reported and checked."""
        local_sq_norm = perturbation_sq_norm(
            pending.locals, grads, adaptive=self.options.adaptive, foreach=self.options.foreach
        )
        grad_norm = self.strategy.sum_scalar(local_sq_norm).sqrt()
        pending.report.grad_norm = grad_norm
        pending.checks.append(("gradient", all_finite_flag(grad_norm)))
        return grad_norm

    def _check_estimates(self, pending: StepState, gradient_at_point: list[torch.Tensor]) -> None:
        """The finite-difference estimate's underflow diagnostic and finiteness check."""
        pending.report.hessian_underflow = curvature_underflow(pending.estimates, gradient_at_point)
        pending.checks.append(("Hessian estimate", self._all_finite(pending.estimates)))

    def _gradsall_finite_flag(self, params: list[torch.Tensor]) -> torch.Tensor:
        return self._all_finite(self._local_grads(params, [self.strategy.local(p) for p in params]))

    def _all_finite(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """A local flag: ``update`` ANDs all flags over ranks in one collective."""
        return all_finite_flag(sq_norm(tensors, foreach=self.options.foreach))

    def _first_nonfinite(self, checks: list[tuple[str, torch.Tensor]]) -> str | None:
        if not checks:
            return None
        flags = self.strategy.all_true(torch.stack([flag.to(checks[0][1].device) for _, flag in checks]))
        flags = flags.tolist()
        return next((name for (name, _), ok in zip(checks, flags, strict=True) if not ok), None)

    def _ensure_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if keys.MOMENTUM in state:
            return
        dtype = state_dtype(p.dtype)
        state[keys.MOMENTUM] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state[keys.HESSIAN_DIAG] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state[keys.STEP] = torch.tensor(0.0)
        state[keys.HESSIAN_UPDATES] = torch.tensor(0.0)
        state[keys.HESSIAN_CORRECTION] = torch.tensor(1.0, dtype=torch.float64)
        state[keys.HESSIAN_CORRECTION_POWER] = torch.tensor(1.0, dtype=torch.float64)

    def _hyperparameters(self, group: dict[str, Any], power: float) -> UpdateHyperparameters:
        beta1, beta2 = group["betas"]
        return UpdateHyperparameters(
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            hessian_power=power,
            eps_placement=self.options.eps_placement,
            bias_correction=self.options.bias_correction,
            weight_decay_mode=self.options.weight_decay_mode,
            momentum_bias_correction=self.options.momentum_bias_correction,
        )


def _validate_params(params: Iterable[torch.Tensor]) -> None:
    """Refuse parameters Sassha cannot optimize, naming the fix."""
    for p in params:
        if p.is_complex():
            raise ValueError(
                f"Invalid parameter of dtype {p.dtype}: Sassha does not support complex parameters. "
                "Optimize the real and imaginary parts as a real parameter (torch.view_as_real) and "
                "rebuild the complex tensor with torch.view_as_complex in forward."
            )
