"""Consolidated state: model and optimizer gathered into plain CPU tensors, to move between engines."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor

from sassha_dist import schedules
from sassha_dist import state_keys as keys
from sassha_dist.checkpoint.files import _fsync_dir, _on_rank0, _rank
from sassha_dist.checkpoint.fqn_state import (
    _check_fqn_state_dict,
    load_optimizer_state_dict,
    optimizer_state_dict,
)
from sassha_dist.checkpoint.layout import PARAM_GROUPS, STATE, CorruptCheckpointError


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state as plain CPU tensors keyed by FQN, gathered on rank 0.

    ``{"model": {fqn: tensor}, "optimizer": {...FQN-keyed, see optimizer_state_dict...}}`` on
    rank 0 and ``{}`` on the other ranks (call it on every rank: it gathers
    shards). Load it under any engine with :func:`load_full_state_dict`.
    """
    rank0 = _rank() == 0
    model_state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    optim = optimizer_state_dict(model, optimizer)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, entry in optim[STATE].items():
        gathered = {}
        for key, value in entry.items():
            full = value.full_tensor() if isinstance(value, DTensor) else value  # collective for DTensors
            gathered[key] = full.detach().to("cpu", copy=True)
        state[name] = gathered
    if not rank0:
        return {}
    model_state = {k: v.detach().to("cpu", copy=True) for k, v in model_state.items()}
    groups = [_plain_group(g) for g in optim[PARAM_GROUPS]]
    return {
        "model": model_state,
        "optimizer": {STATE: state, PARAM_GROUPS: groups, keys.COUNTERS: optim[keys.COUNTERS]},
    }


def _plain_group(group: Mapping[str, Any]) -> dict[str, Any]:
    """Tensor hyperparameters as floats and schedules as JSON (``sassha_dist.schedules``)."""
    return {
        k: (float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else schedules.to_json(v))
        for k, v in group.items()
    }


def load_full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, full: Mapping[str, Any]) -> None:
    """Load a consolidated state (from :func:`full_state_dict`) into ``model`` and ``optimizer``.

    Every rank passes the full dict (for example each ``torch.load``-ing the
    same file); under FSDP2 each keeps its own shards. Collective.
    """
    if not isinstance(full, Mapping) or "model" not in full or "optimizer" not in full:
        raise ValueError(
            "Invalid consolidated state: expected {'model': ..., 'optimizer': ...} from full_state_dict(), "
            f"got {sorted(map(str, full)) if isinstance(full, Mapping) else type(full).__name__}."
        )
    _check_fqn_state_dict(full["optimizer"])
    _check_model_keys(model, {k: tuple(v.shape) for k, v in full["model"].items()}, "the consolidated state")
    set_model_state_dict(model, dict(full["model"]), options=StateDictOptions(full_state_dict=True))
    load_optimizer_state_dict(model, optimizer, full["optimizer"])


def _check_model_keys(model: nn.Module, saved: Mapping[str, tuple[int, ...]], where: str) -> None:
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The model does not match {where}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "was it saved for another model?"
        )
    for name, shape in expected.items():
        if saved[name] is not None and tuple(saved[name]) != shape:
            raise ValueError(
                f"The model does not match {where}: {name!r} has shape {tuple(saved[name])} there and "
                f"{shape} in the model; was it saved for another model?"
            )


def export_full(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """:func:`full_state_dict` written by rank 0 to one ``torch.save`` file, atomically. Collective."""
    path = Path(path)
    full = full_state_dict(model, optimizer)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(full, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    _on_rank0(write)
    return path


def import_full(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank reads ``path`` (from :func:`export_full`) and loads it. Collective."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No consolidated checkpoint at {path}.")
    try:
        full = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CorruptCheckpointError(f"Cannot read the consolidated checkpoint {path}: {error}") from error
    load_full_state_dict(model, optimizer, full)
