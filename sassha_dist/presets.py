"""The authors' recipes as keyword sets for :class:`~sassha_dist.Sassha` (``Sassha.authors``).

Three recipes, each read from the authors' public code (LOG-postech/Sassha; SPEC §2):

* ``"image"`` (:data:`AUTHORS_PRESET`): their image-classification optimizer
  (``optimizers/sassha.py``). lr 0.15, betas (0.9, 0.999), rho 0.2, k 10, eps 1e-4 after the
  power, ``D`` bias-corrected by the per-parameter step frozen at each Hessian refresh
  (``bias_correction="global_step"``), decoupled ``p *= 1 - lr*wd``, exact Hessian, one probe
  stream shared by every rank.
* ``"lm"`` (:data:`AUTHORS_LM_PRESET` plus two schedules): their GPT-2 recipe
  (``language_tasks/modeling``: ``optimizers/sassha.py``, ``train_sassha.py``,
  ``config/train_gpt2_small_sassha.py``). lr 0.3, betas (0.965, 0.99), weight decay 2e-4, k 10,
  eps 1e-4 after the power, no bias correction of ``m`` or ``D``, Hessian exact where the engine
  allows it; ``rho`` 0 during a warm-up, then 0.02; Hessian power 1 during a warm-up, then 0.8.
* ``"momentum"`` (:data:`AUTHORS_MOMENTUM_PRESET`): their M-SASSHA (``optimizers/msassha.py``),
  whose ascent follows the momentum (``perturbation="momentum"``): one pass per step. lr 0.15,
  betas (0.9, 0.999), rho 0.3, weight decay 1e-2 as ``p *= 1 - lr*wd``, k 10, eps 1e-4 after
  the power, Hessian power 1, ``D`` corrected as in the image recipe, exact Hessian, one probe
  stream shared by every rank.

The warm-ups keep the authors' meaning and names: their loop counts iterations from 0 and
perturbs once ``iter_num > rho_warmup_iters``; their power schedule returns the warm-up value
while its counter is ``<= hessian_warmup_iters``. With 1-based steps that is the first
``warmup_iters + 1`` steps (2001 with their 2000).
"""

from __future__ import annotations

from typing import Any

from sassha_dist.schedules import PiecewiseConstant

__all__ = ["AUTHORS_LM_PRESET", "AUTHORS_MOMENTUM_PRESET", "AUTHORS_PRESET", "RECIPES", "authors_options"]

RECIPE_IMAGE, RECIPE_LM, RECIPE_MOMENTUM = "image", "lm", "momentum"
RECIPES = (RECIPE_IMAGE, RECIPE_LM, RECIPE_MOMENTUM)

#: The authors' image optimizer, as keyword arguments: ``Sassha(params, **AUTHORS_PRESET)`` or
#: ``Sassha.authors(params)``. Their configs pass ``weight_decay / lr`` to get a per-step decay
#: of ``weight_decay``.
AUTHORS_PRESET: dict[str, Any] = {
    "lr": 0.15,
    "betas": (0.9, 0.999),
    "weight_decay": 0.0,
    "rho": 0.2,
    "lazy_hessian": 10,
    "n_samples": 1,
    "hessian_power": 0.5,
    "eps": 1e-4,
    "perturb_eps": 1e-12,
    "eps_placement": "after_power",
    "bias_correction": "global_step",
    "weight_decay_mode": "lr_scaled",
    "hessian_method": "exact",
    "probe_mode": "global",
}

#: The authors' M-SASSHA (``optimizers/msassha.py``), as keyword arguments:
#: ``Sassha.authors(params, recipe="momentum")``.
AUTHORS_MOMENTUM_PRESET: dict[str, Any] = {
    **AUTHORS_PRESET,
    "weight_decay": 1e-2,
    "rho": 0.3,
    "hessian_power": 1.0,
    "perturbation": "momentum",
}

#: The authors' GPT-2 optimizer settings, without the two warm-up schedules that
#: :func:`authors_options` adds (``rho`` and ``hessian_power``).
AUTHORS_LM_PRESET: dict[str, Any] = {
    "lr": 0.3,
    "betas": (0.965, 0.99),
    "weight_decay": 2e-4,
    "lazy_hessian": 10,
    "n_samples": 1,
    "eps": 1e-4,
    "perturb_eps": 1e-12,
    "eps_placement": "after_power",
    "bias_correction": "none",
    "momentum_bias_correction": False,
    "weight_decay_mode": "lr_scaled",
    "hessian_method": "auto",
    "probe_mode": "global",
}
#: The GPT-2 recipe's values after and during the warm-ups, and the warm-up length.
LM_RHO, LM_HESSIAN_POWER, LM_WARMUP_ITERS = 0.02, 0.8, 2000
LM_WARMUP_RHO, LM_WARMUP_HESSIAN_POWER = 0.0, 1.0


def _warmup_iters(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}={value!r}. Must be an int >= 0 (the authors' iterations, from 0).")
    return value


def _after_warmup(value: Any, warmup_value: float, warmup_iters: int) -> Any:
    """``value`` after ``warmup_iters + 1`` steps of ``warmup_value``; a callable is kept as given."""
    if callable(value):
        return value
    return PiecewiseConstant((warmup_value, value), (warmup_iters + 1,))


def authors_options(recipe: str = RECIPE_IMAGE, **overrides: Any) -> dict[str, Any]:
    """``Sassha`` keyword arguments for the authors' ``recipe``, with ``overrides`` on top.

    ``recipe="lm"`` also takes ``rho_warmup_iters`` and ``hessian_warmup_iters`` (default 2000,
    the authors'); a float ``rho`` or ``hessian_power`` is the value after its warm-up, a
    callable replaces the schedule.
    """
    if recipe in (RECIPE_IMAGE, RECIPE_MOMENTUM):
        extra = sorted({"rho_warmup_iters", "hessian_warmup_iters"} & set(overrides))
        if extra:
            raise ValueError(f"Invalid {extra} for {recipe=}: only recipe='lm' has warm-ups.")
        preset = AUTHORS_PRESET if recipe == RECIPE_IMAGE else AUTHORS_MOMENTUM_PRESET
        return {**preset, **overrides}
    if recipe == RECIPE_LM:
        rho_iters = _warmup_iters("rho_warmup_iters", overrides.pop("rho_warmup_iters", LM_WARMUP_ITERS))
        power_iters = _warmup_iters(
            "hessian_warmup_iters", overrides.pop("hessian_warmup_iters", LM_WARMUP_ITERS)
        )
        rho = _after_warmup(overrides.pop("rho", LM_RHO), LM_WARMUP_RHO, rho_iters)
        power = _after_warmup(
            overrides.pop("hessian_power", LM_HESSIAN_POWER), LM_WARMUP_HESSIAN_POWER, power_iters
        )
        return {**AUTHORS_LM_PRESET, "rho": rho, "hessian_power": power, **overrides}
    raise ValueError(f"Invalid {recipe=}. Must be one of {', '.join(map(repr, RECIPES))}.")
