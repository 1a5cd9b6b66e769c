"""SASSHA's options: their choices, defined once, their validation, and the check against an engine.

* The string choices are ``Literal`` types with their allowed values (:data:`CHOICES`), used by
  :class:`SasshaOptions`, the kernels (:mod:`sassha_dist.functional`) and the reference oracle.
* :class:`SasshaOptions` holds the optimizer-wide settings and validates them;
  :func:`validate_group` validates one parameter group's.
* :func:`resolve_options` is the one place where options meet an engine's
  :class:`EngineCapabilities`: it refuses what the engine cannot run, naming the fix, and
  resolves the ``"auto"`` choices. ``Sassha.use_strategy``, ``ZeroSassha`` and the Trainer's
  start-up checks all call it.

Every invalid value raises ``ValueError(f"Invalid {name}={value!r}. ...")``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

__all__ = [
    "CHOICES",
    "RENAMED_CHOICES",
    "EngineCapabilities",
    "ResolvedOptions",
    "SasshaOptions",
    "check_bool",
    "check_choice",
    "check_number",
    "check_power",
    "check_rho",
    "current_choice",
    "resolve_options",
    "validate_group",
]

HessianMethod = Literal["auto", "exact", "finite_difference"]
FdScheme = Literal["central", "forward"]
EpsPlacement = Literal["after_power", "inside_power"]
BiasCorrection = Literal["hessian_refreshes", "global_step", "none"]
WeightDecayMode = Literal["lr_scaled", "lr_independent"]
ProbeMode = Literal["auto", "per_rank", "global"]
OnNonfinite = Literal["skip", "raise"]
Perturbation = Literal["gradient", "momentum"]

HESSIAN_AUTO, HESSIAN_EXACT, HESSIAN_FINITE_DIFFERENCE = get_args(HessianMethod)
FD_CENTRAL, FD_FORWARD = get_args(FdScheme)
EPS_AFTER_POWER, EPS_INSIDE_POWER = get_args(EpsPlacement)
BIAS_CORRECTION_HESSIAN_REFRESHES, BIAS_CORRECTION_GLOBAL_STEP, BIAS_CORRECTION_NONE = get_args(
    BiasCorrection
)
#: Deprecated alias of :data:`BIAS_CORRECTION_HESSIAN_REFRESHES` (removed in the next release).
BIAS_CORRECTION_HESSIAN_UPDATES = BIAS_CORRECTION_HESSIAN_REFRESHES
WEIGHT_DECAY_LR_SCALED, WEIGHT_DECAY_LR_INDEPENDENT = get_args(WeightDecayMode)
PROBES_AUTO, PROBES_PER_RANK, PROBES_GLOBAL = get_args(ProbeMode)
NONFINITE_SKIP, NONFINITE_RAISE = get_args(OnNonfinite)
PERTURB_GRADIENT, PERTURB_MOMENTUM = get_args(Perturbation)

#: Every string option and its allowed values.
CHOICES: dict[str, tuple[str, ...]] = {
    "hessian_method": get_args(HessianMethod),
    "fd_scheme": get_args(FdScheme),
    "eps_placement": get_args(EpsPlacement),
    "bias_correction": get_args(BiasCorrection),
    "weight_decay_mode": get_args(WeightDecayMode),
    "probe_mode": get_args(ProbeMode),
    "on_nonfinite": get_args(OnNonfinite),
    "perturbation": get_args(Perturbation),
}

#: Option values renamed after 0.1.0, accepted with a ``FutureWarning`` for one release: old -> new.
RENAMED_CHOICES: dict[str, dict[str, str]] = {
    "bias_correction": {"hessian_updates": BIAS_CORRECTION_HESSIAN_REFRESHES},
}


def current_choice(name: str, value: Any) -> Any:
    """``value`` under its current name: a renamed choice (:data:`RENAMED_CHOICES`) warns and maps."""
    new = RENAMED_CHOICES.get(name, {}).get(value) if isinstance(value, str) else None
    if new is None:
        return value
    warnings.warn(
        f"{name}={value!r} is deprecated and will be removed in the next release: use {name}={new!r} "
        "(the same behaviour).",
        FutureWarning,
        stacklevel=4,
    )
    return new


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``ValueError`` listing them."""
    if value not in allowed:
        raise ValueError(f"Invalid {name}={value!r}. Must be one of {', '.join(map(repr, allowed))}.")
    return value


@dataclass(frozen=True)
class SasshaOptions:
    """Optimizer-wide settings (per-group ones live in ``param_groups``)."""

    lazy_hessian: int = 10
    n_samples: int = 1
    hessian_power: float | Callable[[int], float] = 0.5
    perturb_eps: float = 1e-12
    adaptive: bool = False
    local_perturbation: bool = False
    seed: int = 0
    hessian_method: HessianMethod = HESSIAN_AUTO
    fd_scheme: FdScheme = FD_CENTRAL
    fd_step: float | None = None
    eps_placement: EpsPlacement = EPS_AFTER_POWER
    bias_correction: BiasCorrection = BIAS_CORRECTION_HESSIAN_REFRESHES
    weight_decay_mode: WeightDecayMode = WEIGHT_DECAY_LR_SCALED
    probe_mode: ProbeMode = PROBES_AUTO
    on_nonfinite: OnNonfinite = NONFINITE_SKIP
    foreach: bool | None = None
    momentum_bias_correction: bool = True
    replay_rng: bool = True
    perturbation: Perturbation = PERTURB_GRADIENT

    def __post_init__(self) -> None:
        for name in ("adaptive", "local_perturbation", "momentum_bias_correction", "replay_rng"):
            check_bool(name, getattr(self, name))
        if self.foreach is not None:
            check_bool("foreach", self.foreach)
        lazy_hessian, n_samples, seed = self.lazy_hessian, self.n_samples, self.seed
        if isinstance(lazy_hessian, bool) or not isinstance(lazy_hessian, int) or lazy_hessian < 1:
            raise ValueError(f"Invalid {lazy_hessian=}. Must be an int >= 1.")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"Invalid {n_samples=}. Must be an int >= 1.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid {seed=}. Must be an int >= 0.")
        if not callable(self.hessian_power):
            check_power(self.hessian_power)
        perturb_eps = check_number("perturb_eps", self.perturb_eps)
        if not perturb_eps >= 0.0:
            raise ValueError(f"Invalid {perturb_eps=}. Must be >= 0.")
        fd_step = self.fd_step
        if fd_step is not None and not (0.0 < check_number("fd_step", fd_step) < math.inf):
            raise ValueError(f"Invalid {fd_step=}. Must be > 0 and finite, or None for the dtype's default.")
        for name in RENAMED_CHOICES:
            object.__setattr__(self, name, current_choice(name, getattr(self, name)))
        for name, allowed in CHOICES.items():
            check_choice(name, getattr(self, name), allowed)
        if self.perturbation == PERTURB_MOMENTUM:
            for name in ("adaptive", "local_perturbation"):
                if getattr(self, name):
                    raise ValueError(
                        f"Invalid {name}=True with perturbation='momentum': the momentum ascent "
                        f"w - rho m / ||m|| is neither adaptive nor per rank. Use {name}=False."
                    )

    def power_at(self, step: int) -> float:
        """The Hessian power for (1-based) ``step``; a schedule is validated on every call."""
        if callable(self.hessian_power):
            return check_power(self.hessian_power(step), f"hessian_power({step})")
        return self.hessian_power


def check_number(name: str, value: Any) -> float:
    """``value`` as a float, or ``ValueError`` naming it (a string or a bool is not a number here)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"Invalid {name}={value!r} ({type(value).__name__}). Must be a number, e.g. {name}=0.1 "
            "(from a config or command line, convert it first: float(value))."
        )
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}={value!r} ({type(value).__name__}). Must be True or False.")
    return value


def check_rho(rho: Any, name: str = "rho") -> float:
    value = check_number(name, rho)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"Invalid {name}={rho!r}. Must be >= 0 and finite, or a callable of the step.")
    return value


def check_power(hessian_power: Any, name: str = "hessian_power") -> float:
    if (
        isinstance(hessian_power, bool)
        or not isinstance(hessian_power, (int, float))
        or not 0.0 < hessian_power <= 1.0
    ):
        raise ValueError(
            f"Invalid {name}={hessian_power!r}. Must be a float in (0, 1] or a callable of the step."
        )
    return float(hessian_power)


def validate_group(group: dict[str, Any]) -> None:
    """Check one parameter group's hyperparameters; errors name the value and the fix."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"Invalid lr of shape {tuple(lr.shape)}. Must be a float or a 1-element tensor.")
    lr = check_number("lr", lr)
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid {lr=}. Must be >= 0 and finite.")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid {betas=}. Must be a pair (beta1, beta2).")
    for i, beta in enumerate(betas):
        if not 0.0 <= check_number(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"Invalid betas[{i}]={beta!r}. Must be in [0, 1).")
    weight_decay = check_number("weight_decay", group["weight_decay"])
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid {weight_decay=}. Must be >= 0 and finite.")
    if not callable(group["rho"]):
        check_rho(group["rho"])
    eps = check_number("eps", group["eps"])
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid {eps=}. Must be >= 0 and finite.")


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine allows SASSHA to do, as far as options care (a strategy's ``capabilities``)."""

    #: The engine's name in error messages (the strategy's class name).
    name: str
    #: Exact Hessian-vector products (double backward) work.
    exact_hessian: bool
    #: ``hessian_method="auto"`` picks them (false where they cost unsharded memory).
    prefers_exact_hessian: bool
    #: Each rank can take an unreduced gradient of its own loss (whole parameters).
    local_gradients: bool
    #: Only model-wide probes work (the Hessian comes from engine-reduced gradients).
    global_probes_only: bool = False


@dataclass(frozen=True)
class ResolvedOptions:
    """The ``"auto"`` choices of :class:`SasshaOptions`, resolved for one engine."""

    hessian_method: Literal["exact", "finite_difference"]
    probe_mode: Literal["per_rank", "global"]


def resolve_options(options: SasshaOptions, engine: EngineCapabilities) -> ResolvedOptions:
    """Check ``options`` against ``engine`` and resolve the ``"auto"`` choices.

    Raises ``ValueError`` naming the fix for a combination the engine cannot run.
    """
    if options.hessian_method == HESSIAN_EXACT and not engine.exact_hessian:
        raise ValueError(
            f"Invalid hessian_method='exact' under {engine.name}: this engine does not "
            "allow double backward here. Use hessian_method='finite_difference' (or 'auto'); under "
            "FSDP2, exact Hessians need strategy=FullyShard(model.parameters(), module=model)."
        )
    if options.local_perturbation and not engine.local_gradients:
        raise ValueError(
            f"Invalid local_perturbation=True under {engine.name}: it needs every rank "
            "to hold whole parameters (DDP or a single device). Use local_perturbation=False."
        )
    hessian_method = (
        options.hessian_method
        if options.hessian_method != HESSIAN_AUTO
        else (HESSIAN_EXACT if engine.prefers_exact_hessian else HESSIAN_FINITE_DIFFERENCE)
    )
    if options.local_perturbation and hessian_method != HESSIAN_EXACT:
        # Ranks perturbed to different points would pick different finite-difference steps.
        raise ValueError(
            "Invalid local_perturbation=True with hessian_method='finite_difference': local "
            "perturbation needs hessian_method='exact' (as in the authors' code)."
        )
    probe_mode = (
        options.probe_mode
        if options.probe_mode != PROBES_AUTO
        else (PROBES_PER_RANK if hessian_method == HESSIAN_EXACT else PROBES_GLOBAL)
    )
    if engine.global_probes_only and probe_mode != PROBES_GLOBAL:
        raise ValueError(
            f"Invalid probe_mode={probe_mode!r} under {engine.name}: the Hessian comes from "
            "engine-reduced gradients, so probes must be global. Use probe_mode='global' (or 'auto')."
        )
    return ResolvedOptions(hessian_method, probe_mode)
