r"""Reference SASSHA: a plain, slow, single-tensor implementation used as the test oracle.

Every other implementation in this package is tested against :class:`ReferenceSassha`, so this
file favours clarity over speed: one Python loop over tensors, no ``foreach`` kernels, state
updated by rebinding new tensors, and each line carrying the formula it implements. It emulates
``W = len(batches)`` data-parallel ranks in one process: rank ``r`` sees ``f_r(θ) = loss_fn(θ, batches[r])``
and ``f = mean_r f_r``.

One step (``t`` = steps taken so far, ``n`` = Hessian updates so far)::

    g_r  = ∇f_r(θ)                      g = mean_r g_r
    s    = |θ| if adaptive else 1       e = ρ · s² · g / (‖s ⊙ g‖₂ + perturb_eps)   (norm over all params;
                                        ρ = rho(t + 1) for a schedule, per group)
                                        (local_perturbation: rank r uses its own g_r, giving e_r)
    θ'_r = θ + e                        gt = mean_r ∇f_r(θ'_r)
                                        (perturbation="momentum", M-SASSHA: no g;
                                        θ' = θ - ρ m / (‖m‖₂ + perturb_eps) for every rank,
                                        with m as the previous step left it)
    k    = hessian_power(t + 1) or hessian_power
    if t % lazy_hessian == 0:           (Hutchinson, S = n_samples Rademacher probes z_{r,s})
        Ht = mean_r (1/S) Σ_s z_{r,s} ⊙ (H_r(θ'_r) z_{r,s})
        D  = β₂ D + (1 - β₂) |Ht|       n = n + 1
        c_r, k_r = 1 - β₂^(t+1), k      (the authors' correction, frozen until the next refresh)
    t    = t + 1
    m    = β₁ m + (1 - β₁) gt           m̂ = m / (1 - β₁ᵗ)   (m̂ = m without momentum_bias_correction)
    (in, out) = (1 - β₂ⁿ, (1 - β₂ⁿ)ᵏ)   (bias_correction = hessian_refreshes)
              | (c_r, c_rᵏʳ)             (global_step, the authors' rule)
              | (1, 1)                   (none)
    den  = Dᵏ / out + ε                 (eps_placement = after_power)
         | (D / in + ε)ᵏ                (eps_placement = inside_power)
    θ    = θ - lr · m̂ / den - lr · wd · θ   (weight_decay_mode = lr_scaled; lr_independent drops the lr)

Probes: ``z_{r,s}`` for parameter ``i`` is ``rademacher(probe_key(seed, n, i, s, rank=r))`` with
``r`` the rank (``probe_mode="per_rank"``) or 0 for every rank (``"global"``, where the formula
above equals ``(1/S) Σ_s z_s ⊙ (mean_r H_r z_s)`` exactly because ``z ⊙ z = 1``).
``H z`` is a double-backward HVP (``"exact"``) or a finite difference of gradients at
``w = θ'_r`` with ``h = fd_step · ‖w‖₂ / ‖z‖₂`` (``h = fd_step`` when ``‖w‖ = 0``)::

    central: H z ≈ (∇f_r(w + h z) - ∇f_r(w - h z)) / 2h      forward: H z ≈ (∇f_r(w + h z) - ∇f_r(w)) / h

where ``w - h z`` is computed as ``(w + h z) - 2h z``, the way full-precision ``Sassha`` reaches
it without a copy of ``w`` (it differs from ``w - h z`` by at most one rounding).

Every evaluation of ``f_r`` within one step replays the random numbers of its first
(``replay_rng``, as in ``Sassha``): a loss with dropout keeps its masks across the passes.

If any loss, ``g_r``, ``gt_r`` or ``Ht`` is non-finite the step is skipped: parameters are
restored to exactly ``θ_t``, state and counters are unchanged and ``skipped_steps`` grows by one.
State (``m``, ``D``) and all arithmetic use the parameter dtype promoted to at least float32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sassha_dist.hessian.probes import probe_key, rademacher
from sassha_dist.options import CHOICES, RENAMED_CHOICES, current_choice
from sassha_dist.rng import RngReplay

__all__ = ["ReferenceConfig", "ReferenceSassha"]

Tensors = list[torch.Tensor]
_GROUP_KEYS = ("lr", "betas", "weight_decay", "rho", "eps")
# The oracle resolves no "auto": it takes the choices themselves (sassha_dist.options).
_CHOICES = {name: tuple(c for c in allowed if c != "auto") for name, allowed in CHOICES.items()}
_CHOICES.pop("on_nonfinite")  # the oracle always skips


@dataclass(frozen=True)
class ReferenceConfig:
    """Hyper-parameters; ``lr``, ``betas``, ``weight_decay``, ``rho``, ``eps`` are per-group defaults."""

    lr: float = 0.15
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    rho: float = 0.05
    lazy_hessian: int = 10
    n_samples: int = 1
    hessian_power: float | Callable[[int], float] = 0.5
    eps: float = 1e-4
    perturb_eps: float = 1e-12
    adaptive: bool = False
    seed: int = 0
    hessian_method: str = "exact"
    fd_scheme: str = "central"
    fd_step: float = 1e-3
    eps_placement: str = "after_power"
    bias_correction: str = "hessian_refreshes"
    weight_decay_mode: str = "lr_scaled"
    probe_mode: str = "per_rank"
    local_perturbation: bool = False
    momentum_bias_correction: bool = True
    replay_rng: bool = True
    perturbation: str = "gradient"

    def __post_init__(self) -> None:
        for name in RENAMED_CHOICES:
            object.__setattr__(self, name, current_choice(name, getattr(self, name)))
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Invalid {name}={getattr(self, name)!r}. Must be one of {allowed}.")
        if self.lazy_hessian < 1 or self.n_samples < 1:
            raise ValueError(f"Invalid {self.lazy_hessian=}, {self.n_samples=}. Both must be >= 1.")


@dataclass(frozen=True)
class _RankBatch:
    """An emulated rank's batch, tagged with the rank for the random-number replay."""

    rank: int
    batch: object


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in tensors)


def _mean(per_rank: Sequence[Tensors]) -> Tensors:
    """``mean_r x_r`` per tensor, summed in rank order then divided by ``W``."""
    return [sum(xs[1:], xs[0]) / len(xs) for xs in zip(*per_rank)]


def _axpy(x: Tensors, alpha: float, y: Tensors) -> Tensors:
    """``x + alpha · y`` per tensor (new tensors)."""
    return [xi + alpha * yi for xi, yi in zip(x, y)]


class ReferenceSassha:
    """Oracle SASSHA over leaf tensors that are updated in place; see the module docstring."""

    def __init__(self, groups: Sequence[dict] | Sequence[torch.Tensor], config: ReferenceConfig):
        groups = list(groups)
        if groups and all(isinstance(g, torch.Tensor) for g in groups):
            groups = [{"params": groups}]
        self.config = config
        self.groups: list[dict] = []
        for group in groups:
            unknown = set(group) - {"params", *_GROUP_KEYS}
            if unknown:
                raise ValueError(f"Invalid group keys {sorted(unknown)}. Allowed: params, {_GROUP_KEYS}.")
            full = {key: group.get(key, getattr(config, key)) for key in _GROUP_KEYS}
            full["params"] = list(group["params"])
            self.groups.append(full)
        # Flat views over all groups, in group order; index i is the probe's param_index.
        self.params: Tensors = [p for group in self.groups for p in group["params"]]
        self.group_of: list[dict] = [group for group in self.groups for _ in group["params"]]
        for i, p in enumerate(self.params):
            if not (p.is_leaf and p.requires_grad):
                raise ValueError(f"Parameter {i} must be a leaf tensor with requires_grad=True.")
        self.state_dtypes = [torch.promote_types(p.dtype, torch.float32) for p in self.params]
        self.m: Tensors = [torch.zeros_like(p, dtype=d) for p, d in zip(self.params, self.state_dtypes)]
        self.D: Tensors = [torch.zeros_like(p, dtype=d) for p, d in zip(self.params, self.state_dtypes)]
        self.step_count = 0
        self.hessian_refreshes = 0
        self.skipped_steps = 0
        self.refresh_power = 1.0  # k_r of the last refresh; c_r is kept per group

    @property
    def hessian_updates(self) -> int:
        """Deprecated name of :attr:`hessian_refreshes` (removed in the next release)."""
        warnings.warn(
            "ReferenceSassha.hessian_updates is deprecated: use hessian_refreshes.",
            FutureWarning,
            stacklevel=2,
        )
        return self.hessian_refreshes

    # ----------------------------------------------------------------------------------- helpers
    def _write(self, point: Tensors) -> None:
        """``params <- point`` (cast to each param's dtype), in place."""
        with torch.no_grad():
            for p, x in zip(self.params, point):
                p.copy_(x)

    def _loss_and_grad(self, loss_fn, point: Tensors, batch, create_graph: bool = False):
        """``(f_r(point), ∇f_r(point))``; unused params get zero grads. Grads stay in param dtype
        (with a graph) when ``create_graph``, otherwise they are detached and cast to state dtype."""
        self._write(point)
        loss = loss_fn(self.params, batch)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        else:
            grads = [None] * len(self.params)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        if not create_graph:
            grads = [g.detach().to(d) for g, d in zip(grads, self.state_dtypes)]
        return loss.detach(), grads

    def _probe(self, n: int, sample: int, rank: int) -> Tensors:
        """``z[i] = rademacher(probe_key(seed, n, i, sample, rank))`` shaped like param ``i``."""
        rank = rank if self.config.probe_mode == "per_rank" else 0
        return [
            rademacher(
                probe_key(self.config.seed, n, i, sample, rank=rank), p.numel(), dtype=d, device=p.device
            ).view_as(p)
            for i, (p, d) in enumerate(zip(self.params, self.state_dtypes))
        ]

    def _perturbation(self, grads: Tensors, theta: Tensors, step: int) -> Tensors:
        """``e = ρ · s² · g / (‖s ⊙ g‖₂ + perturb_eps)`` with ``s = |θ|`` (adaptive) or 1; one global norm.

        ``ρ`` is the group's ``rho``, or ``rho(step)`` for a schedule (1-based ``step``).
        """
        scale = [x.abs() if self.config.adaptive else torch.ones_like(x) for x in theta]
        norm = torch.sqrt(sum(((s * g) ** 2).sum() for s, g in zip(scale, grads)))
        return [
            (group["rho"](step) if callable(group["rho"]) else group["rho"])
            * s**2
            * g
            / (norm + self.config.perturb_eps)
            for group, s, g in zip(self.group_of, scale, grads)
        ]

    def _momentum_ascent(self, theta: Tensors, step: int) -> Tensors:
        """``θ - ρ · m / (‖m‖₂ + perturb_eps)``, one norm over all params (``perturbation="momentum"``)."""
        norm = torch.sqrt(sum((m**2).sum() for m in self.m))
        return [
            x
            - (group["rho"](step) if callable(group["rho"]) else group["rho"])
            * m
            / (norm + self.config.perturb_eps)
            for group, x, m in zip(self.group_of, theta, self.m)
        ]

    def _exact_hvp(self, graph_grads: Tensors, z: Tensors) -> Tensors:
        """``H z = ∇(g · z)`` by double backward through ``graph_grads`` (built with create_graph)."""
        terms = [(g * zi.to(g.dtype)).sum() for g, zi in zip(graph_grads, z) if g.requires_grad]
        if not terms:  # gradient constant in the params: H = 0
            return [torch.zeros_like(zi) for zi in z]
        hz = torch.autograd.grad(sum(terms), self.params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(zi) if h is None else h.detach().to(zi.dtype) for h, zi in zip(hz, z)]

    def _fd_hvp(self, loss_fn, batch, w: Tensors, grad_w: Tensors, z: Tensors) -> Tensors:
        """Finite-difference ``H z`` at ``w``, ``h = fd_step · ‖w‖ / ‖z‖`` (``fd_step`` if ``‖w‖ = 0``)."""
        w_norm = math.sqrt(sum(float((x**2).sum()) for x in w))
        z_norm = math.sqrt(sum(zi.numel() for zi in z))  # ‖z‖ of a Rademacher vector
        h = self.config.fd_step * w_norm / z_norm if w_norm > 0 else self.config.fd_step
        plus = _axpy(w, h, z)
        _, grad_plus = self._loss_and_grad(loss_fn, plus, batch)
        if self.config.fd_scheme == "central":
            # w - hz reached from w + hz, as Sassha steps without a copy of w (one rounding apart)
            _, grad_minus = self._loss_and_grad(loss_fn, _axpy(plus, -2 * h, z), batch)
            return [(gp - gm) / (2 * h) for gp, gm in zip(grad_plus, grad_minus)]
        return [(gp - g0) / h for gp, g0 in zip(grad_plus, grad_w)]

    def _perturbed_rank(self, loss_fn, w: Tensors, batch, rank: int, n: int, hessian_step: bool):
        """At ``w = θ'_r``: ``(f_r(w), ∇f_r(w), (1/S) Σ_s z_s ⊙ H_r z_s or None)``."""
        exact = hessian_step and self.config.hessian_method == "exact"
        loss, raw = self._loss_and_grad(loss_fn, w, batch, create_graph=exact)
        grad = [g.detach().to(d) for g, d in zip(raw, self.state_dtypes)]
        if not hessian_step:
            return loss, grad, None
        S = self.config.n_samples
        ht = [torch.zeros_like(g) for g in grad]
        for s in range(S):
            z = self._probe(n, s, rank)
            hz = self._exact_hvp(raw, z) if exact else self._fd_hvp(loss_fn, batch, w, grad, z)
            ht = [acc + zi * hzi / S for acc, zi, hzi in zip(ht, z, hz)]  # += (1/S) z ⊙ (H z)
        return loss, grad, ht

    def _skip(self, theta: Tensors, loss: float) -> float:
        """Non-finite step: restore ``θ_t`` exactly, leave state alone, count the skip."""
        self._write(theta)
        self.skipped_steps += 1
        return loss

    # -------------------------------------------------------------------------------------- step
    def step(self, loss_fn, batches) -> float:
        """One SASSHA step over ``W = len(batches)`` emulated ranks; returns ``mean_r f_r(θ_t)``."""
        batches = list(batches)
        W = len(batches)
        if W < 1:
            raise ValueError("Need at least one batch (one per emulated rank).")
        theta_saved = [p.detach().clone() for p in self.params]  # exact θ_t, param dtype
        if self.config.replay_rng:
            # Every evaluation of rank r's loss in this step draws the random numbers of its first
            # (dropout masks), as Sassha's replay_rng does; ranks are evaluated first in order.
            replay, rank_loss = RngReplay([]), loss_fn
            ranked = [_RankBatch(r, b) for r, b in enumerate(batches)]

            def replayed(params, ranked_batch):
                with replay.around(ranked_batch.rank):
                    return rank_loss(params, ranked_batch.batch)

            loss_fn, batches = replayed, ranked
        try:
            return self._step(loss_fn, batches, theta_saved)
        except BaseException:  # a failing loss_fn must not leave the params at a probe point
            self._write(theta_saved)
            raise
        finally:
            if self.config.replay_rng:
                replay.finish()

    def _step(self, loss_fn, batches: list, theta_saved: Tensors) -> float:
        W, cfg = len(batches), self.config
        t, n = self.step_count, self.hessian_refreshes
        theta = [x.to(d) for x, d in zip(theta_saved, self.state_dtypes)]  # θ_t, state dtype

        if cfg.perturbation == "momentum":
            # 1-2. M-SASSHA: θ' = θ - ν m, ν = ρ / (‖m‖₂ + perturb_eps), with m before this step's
            # update (m = 0 on the first step: θ' = θ); the step's one pass is at θ'.
            loss = None  # the loss at θ', below
            points = [self._momentum_ascent(theta, t + 1)] * W
        else:
            # 1. g_r = ∇f_r(θ), g = mean_r g_r
            losses, grads = zip(*(self._loss_and_grad(loss_fn, theta, b) for b in batches))
            loss = sum(float(x) for x in losses) / W
            if not all(_all_finite([x, *g]) for x, g in zip(losses, grads)):
                return self._skip(theta_saved, loss)
            g = _mean(grads)
            # 2. θ'_r = θ + e (or θ + e_r)
            if cfg.local_perturbation:
                points = [_axpy(theta, 1.0, self._perturbation(g_r, theta, t + 1)) for g_r in grads]
            else:
                points = [_axpy(theta, 1.0, self._perturbation(g, theta, t + 1))] * W

        # 3. gt = mean_r ∇f_r(θ'_r); 4. Ht = mean_r (1/S) Σ_s z ⊙ H_r z
        hessian_step = t % cfg.lazy_hessian == 0
        results = [self._perturbed_rank(loss_fn, points[r], batches[r], r, n, hessian_step) for r in range(W)]
        gt = _mean([grad_r for _, grad_r, _ in results])
        ht = _mean([ht_r for _, _, ht_r in results]) if hessian_step else []
        if loss is None:
            loss = sum(float(x) for x, _, _ in results) / W
        if not all(_all_finite([x]) for x, _, _ in results) or not _all_finite(gt + ht):
            return self._skip(theta_saved, loss)

        # 5. Moments, bias corrections and the update, applied to the exact θ_t.
        if hessian_step:
            n += 1
        t += 1
        power = cfg.hessian_power(t) if callable(cfg.hessian_power) else cfg.hessian_power
        if hessian_step:
            self.refresh_power = power  # with c_r = 1 - β₂ᵗ per group, below
        for i, group in enumerate(self.group_of):
            beta1, beta2 = group["betas"]
            self.m[i] = beta1 * self.m[i] + (1 - beta1) * gt[i]  # m = β₁ m + (1 - β₁) gt
            if hessian_step:
                self.D[i] = beta2 * self.D[i] + (1 - beta2) * ht[i].abs()  # D = β₂ D + (1 - β₂)|Ht|
                group["refresh_correction"] = 1 - beta2**t  # c_r, frozen until the next refresh
            m_hat = self.m[i] / (1 - beta1**t) if cfg.momentum_bias_correction else self.m[i]
            c_r = group.get("refresh_correction", 1.0)
            inside, after = {
                "hessian_refreshes": (1 - beta2**n, (1 - beta2**n) ** power),
                "global_step": (c_r, c_r**self.refresh_power),
                "none": (1.0, 1.0),
            }[cfg.bias_correction]
            if cfg.eps_placement == "after_power":
                denom = self.D[i] ** power / after + group["eps"]  # Dᵏ / out + ε
            else:
                denom = (self.D[i] / inside + group["eps"]) ** power  # (D / in + ε)ᵏ
            decay_rate = group["weight_decay"] * (
                group["lr"] if cfg.weight_decay_mode == "lr_scaled" else 1.0
            )
            theta[i] = theta[i] - group["lr"] * m_hat / denom - decay_rate * theta[i]
        self._write(theta)
        self.step_count, self.hessian_refreshes = t, n
        return loss
