"""Optimizer state keyed by parameter name, in memory, and its validated loading under any engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from sassha_dist import schedules
from sassha_dist import state_keys as keys
from sassha_dist.checkpoint.layout import (
    PARAM_GROUPS,
    STATE,
    _names_of,
    _optimizer_params,
)
from sassha_dist.functional import state_dtype


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (see the module docstring for the layout).

    Tensors are the live state (like ``Optimizer.state_dict``): copy or save
    them before the next step. Parameters without state (frozen, or not used
    yet) have no entry. Raises ``RuntimeError`` inside a step.
    """
    names = _names_of(model, optimizer)
    indexed = optimizer.state_dict()  # refuses mid-step; holds the counters
    index_to_name = {}
    for saved_group, group_names in zip(indexed[PARAM_GROUPS], _group_names(optimizer, names), strict=True):
        index_to_name.update(zip(saved_group["params"], group_names, strict=True))
    state = {
        index_to_name[index]: {k: entry[k] for k in keys.PER_PARAM + keys.OPTIONAL_PER_PARAM if k in entry}
        for index, entry in indexed[STATE].items()
    }
    groups = [
        {**{k: v for k, v in group.items() if k not in ("params", "param_names")}, "params": group_names}
        for group, group_names in zip(indexed[PARAM_GROUPS], _group_names(optimizer, names), strict=True)
    ]
    return {STATE: state, PARAM_GROUPS: groups, keys.COUNTERS: dict(indexed[keys.COUNTERS])}


def _group_names(optimizer: torch.optim.Optimizer, names: list[str]) -> list[list[str]]:
    result, start = [], 0
    for group in optimizer.param_groups:
        result.append(names[start : start + len(group["params"])])
        start += len(group["params"])
    return result


def _check_groups(saved_groups: list[Mapping[str, Any]], current_groups: list[list[str]]) -> None:
    """Saved param groups must hold the same parameter names as the optimizer's, group by group."""
    if len(saved_groups) != len(current_groups):
        raise ValueError(
            f"Invalid optimizer state: {len(saved_groups)} param groups saved, the optimizer has "
            f"{len(current_groups)}; build the optimizer with the same groups."
        )
    for index, (saved, current) in enumerate(zip(saved_groups, current_groups, strict=True)):
        if not isinstance(saved, Mapping):
            raise ValueError(f"Invalid optimizer state: param group {index} is a {type(saved).__name__}.")
        saved_names = list(saved.get("params", []))
        if set(saved_names) != set(current) or len(saved_names) != len(current):
            extra = sorted(set(saved_names) - set(current))
            lacking = sorted(set(current) - set(saved_names))
            raise ValueError(
                f"Invalid optimizer state: param group {index} was saved with other parameters "
                f"(only in the saved state: {extra[:5]}, only in the optimizer: {lacking[:5]}); "
                "was it saved for another model?"
            )


def _check_fqn_state_dict(state: Any) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"Invalid optimizer state: expected a mapping, got {type(state).__name__}.")
    indexed = isinstance(state.get(STATE), Mapping) and any(isinstance(k, int) for k in state[STATE])
    indexed = indexed or any(
        isinstance(i, int) for g in state.get(PARAM_GROUPS, []) if isinstance(g, Mapping) for i in g["params"]
    )
    if indexed:
        raise ValueError(
            "Invalid FQN-keyed optimizer state: it is keyed by parameter index, like Optimizer.state_dict() "
            "output; load that with optimizer.load_state_dict(), or save with "
            "sassha_dist.checkpoint.optimizer_state_dict(model, optimizer)."
        )
    missing = [k for k in (STATE, PARAM_GROUPS, keys.COUNTERS) if k not in state]
    if missing:
        raise ValueError(
            f"Invalid Sassha FQN-keyed optimizer state: it lacks {missing} "
            f"(it has {sorted(map(str, state))}); was it saved by another optimizer?"
        )
    counters = state[keys.COUNTERS]
    if not isinstance(counters, Mapping) or any(k not in counters for k in keys.COUNTER_NAMES):
        raise ValueError(
            f"Invalid Sassha optimizer state: {keys.COUNTERS} must hold {list(keys.COUNTER_NAMES)}, "
            f"got {counters!r}."
        )


def _to_layout(value: Any, param: torch.Tensor, dtype: torch.dtype, name: str, key: str) -> torch.Tensor:
    """``value`` (a DTensor or a full tensor) laid out like ``param`` (sharded where it is), in ``dtype``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"Invalid optimizer state for {name!r}: {key} is a {type(value).__name__}, not a tensor."
        )
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"Invalid optimizer state for {name!r}: {key} has shape {tuple(value.shape)} but the parameter "
            f"has shape {tuple(param.shape)}; was it saved for another model?"
        )
    if isinstance(param, DTensor):
        if isinstance(value, DTensor):
            if value.device_mesh == param.device_mesh and tuple(value.placements) == tuple(param.placements):
                return value.to(dtype=dtype)
            value = value.full_tensor()
        # Every rank holds the full tensor: each keeps its own shard, no communication.
        return distribute_tensor(
            value.detach().to(device=param.device, dtype=dtype),
            param.device_mesh,
            param.placements,
            src_data_rank=None,
        )
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().to(device=param.device, dtype=dtype)


def load_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load FQN-keyed optimizer state (from :func:`optimizer_state_dict` or a consolidated export).

    Works across engines: DTensor state is resharded or gathered, full tensors
    are sharded into the new parameters' placements. Raises ``ValueError``,
    with the optimizer unchanged, for state of another optimizer, of a model
    with other parameter names or shapes, or with other param groups.
    Collective under FSDP2 when the layouts differ.
    """
    names = _names_of(model, optimizer)
    _check_fqn_state_dict(state)
    params = _optimizer_params(optimizer)
    current_groups = _group_names(optimizer, names)
    saved_groups = list(state[PARAM_GROUPS])
    _check_groups(saved_groups, current_groups)
    unknown = sorted(set(state[STATE]) - set(names))
    if unknown:
        raise ValueError(
            f"Invalid optimizer state: it has state for {unknown[:5]}, which the model's optimized "
            "parameters do not include; was it saved for another model?"
        )
    indexed_state: dict[int, dict[str, Any]] = {}
    for index, (name, p) in enumerate(zip(names, params, strict=True)):
        saved = state[STATE].get(name)
        if saved is None:
            continue
        missing = [k for k in keys.PER_PARAM if k not in saved]
        if missing:
            raise ValueError(
                f"Invalid Sassha optimizer state for {name!r}: it lacks {missing} (it has {sorted(saved)}); "
                "was it saved by another optimizer?"
            )
        indexed_state[index] = {
            keys.MOMENTUM: _to_layout(saved[keys.MOMENTUM], p, state_dtype(p.dtype), name, keys.MOMENTUM),
            keys.HESSIAN_DIAG: _to_layout(
                saved[keys.HESSIAN_DIAG], p, state_dtype(p.dtype), name, keys.HESSIAN_DIAG
            ),
            **{
                k: torch.as_tensor(saved[k], dtype=dtype).detach().cpu()
                for k, dtype in keys.SCALAR_DTYPES.items()
                if k in saved  # the optional entries may be missing: Sassha derives them
            },
        }
    # Saved group order may list the same names in another order: index by the optimizer's order.
    indexed_groups, start = [], 0
    for live, saved, current in zip(optimizer.param_groups, saved_groups, current_groups, strict=True):
        group = {k: schedules.from_json(v) for k, v in saved.items() if k != "params"}
        for k, v in live.items():  # a tensor hyperparameter (lr) stays a tensor where it was one
            if isinstance(v, torch.Tensor) and k in group and not isinstance(group[k], torch.Tensor):
                group[k] = torch.tensor(group[k], dtype=v.dtype, device=v.device)
        group["params"] = list(range(start, start + len(current)))
        start += len(current)
        indexed_groups.append(group)
    optimizer.load_state_dict(
        {STATE: indexed_state, PARAM_GROUPS: indexed_groups, keys.COUNTERS: dict(state[keys.COUNTERS])}
    )
