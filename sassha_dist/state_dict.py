r"""Sassha's ``state_dict`` format beyond torch's: the counters it carries, and a loaded dict's checks.

torch's ``Optimizer.state_dict`` / ``load_state_dict`` index the per-parameter state; Sassha adds
the optimizer-wide counters (``state_keys.COUNTERS``, at the top level and in every group,
because torch's ``get/set_optimizer_state_dict`` keep only ``"state"`` and ``"param_groups"``),
checks a loaded dict before torch touches the optimizer, and restores each entry's dtype.

Older dicts load: without counters they are derived from the per-parameter state; without the
frozen ``"global_step"`` correction (``state_keys.HESSIAN_CORRECTION``) it is derived as if the
parameter had been refreshed on the regular schedule, at its step
:math:`t_r = t - ((t - 1) \bmod k)` with the power ``hessian_power(t_r)``: exact for runs whose
parameters took part in every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from sassha_dist import state_keys as keys
from sassha_dist.functional import state_dtype
from sassha_dist.options import validate_group

__all__ = [
    "check_loadable",
    "counters_from_state",
    "loaded_entry",
    "saved_ids",
    "split_counters",
    "with_counters",
]

_GROUP_KEYS = {"lr", "betas", "weight_decay", "rho", "eps"}


def with_counters(state_dict: dict[str, Any], counters: Mapping[str, int]) -> dict[str, Any]:
    """``state_dict`` with the counters at the top level and in every group."""
    state_dict[keys.COUNTERS] = dict(counters)
    state_dict["param_groups"] = [{**g, keys.COUNTERS: dict(counters)} for g in state_dict["param_groups"]]
    return state_dict


def split_counters(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """torch's part of ``state_dict`` (a shallow copy) and the counters, from the top or a group."""
    state_dict = dict(state_dict)
    groups = [dict(g) for g in state_dict.get("param_groups", [])]
    in_groups = [g.pop(keys.COUNTERS, None) for g in groups]
    state_dict["param_groups"] = groups
    counters = state_dict.pop(keys.COUNTERS, None)
    if counters is None and in_groups and in_groups[0] is not None:
        counters = in_groups[0]
    return state_dict, counters


def check_loadable(state_dict: Mapping[str, Any], params: Sequence[torch.Tensor]) -> None:
    """Refuse a dict another optimizer or another model saved, before anything is loaded."""
    saved_state = state_dict.get("state", {})
    for saved in saved_state.values():
        missing = set(keys.PER_PARAM) - set(saved)
        if missing:
            raise ValueError(
                f"Invalid state_dict for Sassha: a parameter's state lacks {sorted(missing)} "
                f"(it has {sorted(saved)}); was it saved by another optimizer?"
            )
    for group in state_dict.get("param_groups", []):
        missing = _GROUP_KEYS - set(group)
        if missing:
            raise ValueError(
                f"Invalid state_dict for Sassha: a param group lacks {sorted(missing)}; "
                "was it saved by another optimizer?"
            )
        validate_group(group)
    for saved_id, param in zip(saved_ids(state_dict), params, strict=False):
        saved = saved_state.get(saved_id)
        if saved is not None and tuple(saved[keys.MOMENTUM].shape) != tuple(param.shape):
            raise ValueError(
                f"Invalid state_dict for Sassha: state of shape {tuple(saved[keys.MOMENTUM].shape)} "
                f"for a parameter of shape {tuple(param.shape)}; was it saved for another model?"
            )


def saved_ids(state_dict: Mapping[str, Any]) -> list[Any]:
    """The saved parameter ids, in the groups' order (the order of the optimizer's parameters)."""
    return [i for g in state_dict.get("param_groups", []) for i in g["params"]]


def loaded_entry(
    saved: Mapping[str, Any],
    param: torch.Tensor,
    beta2: float,
    lazy_hessian: int,
    power_at: Callable[[int], float],
) -> dict[str, torch.Tensor]:
    """One parameter's state as Sassha keeps it, from a saved entry, as copies.

    torch casts floating state to the parameter's dtype and may alias the caller's tensors: ``m``
    and ``D`` keep the state dtype on the parameter's device, the scalars their
    ``state_keys.SCALAR_DTYPES`` on the CPU. A missing frozen correction is derived (module doc).
    """
    if keys.HESSIAN_CORRECTION not in saved:
        saved = {**saved, **_regular_correction(saved, beta2, lazy_hessian, power_at)}
    entry = {
        key: torch.as_tensor(saved[key], dtype=state_dtype(param.dtype)).to(device=param.device, copy=True)
        for key in (keys.MOMENTUM, keys.HESSIAN_DIAG)
    }
    for key, dtype in keys.SCALAR_DTYPES.items():
        # as_tensor with the dtype: a Python float (a derived correction) keeps float64
        entry[key] = torch.as_tensor(saved[key], dtype=dtype).to(device="cpu", copy=True)
    return entry


def _regular_correction(
    saved: Mapping[str, Any], beta2: float, lazy_hessian: int, power_at: Callable[[int], float]
) -> dict[str, float]:
    """The frozen correction of an older state dict, as if refreshed every ``lazy_hessian`` steps."""
    step, refreshes = int(saved[keys.STEP]), int(saved[keys.HESSIAN_UPDATES])
    if refreshes == 0 or step == 0:
        return {keys.HESSIAN_CORRECTION: 1.0, keys.HESSIAN_CORRECTION_POWER: 1.0}
    refresh_step = step - (step - 1) % lazy_hessian
    return {
        keys.HESSIAN_CORRECTION: 1.0 - beta2**refresh_step,
        keys.HESSIAN_CORRECTION_POWER: power_at(refresh_step),
    }


def counters_from_state(states: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The counters of a dict saved without them: the largest per-parameter counts."""
    states = list(states)
    return {
        keys.GLOBAL_STEP: max([int(s[keys.STEP]) for s in states] or [0]),
        keys.HESSIAN_REFRESHES: max([int(s[keys.HESSIAN_UPDATES]) for s in states] or [0]),
        keys.SKIPPED_STEPS: 0,
    }
