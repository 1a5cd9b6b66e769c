"""The checkpoint layout: key names, parameter names (FQNs), and the corrupt-file error."""

from __future__ import annotations

import re
from typing import TypeVar

import torch
from torch import nn

#: Written last into a checkpoint directory: the format, each file's size and CRC32, and ``extra``.
MANIFEST = "sassha_manifest.json"
#: In a checkpoint root: the name of the newest complete checkpoint directory.
LATEST = "latest"
FORMAT = "sassha_dist.checkpoint/1"

STATE = "state"
PARAM_GROUPS = "param_groups"
_PARAM_GROUPS_JSON = "param_groups_json"  # DCP stores the groups as one JSON string
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 22

T = TypeVar("T")


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or damaged (the message names the file)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "_orig_mod", None)
        if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            model = inner
            continue
        return model


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> fully-qualified name``, as ``get_model_state_dict`` names it.

    Wrapper prefixes (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``,
    activation checkpointing's) are removed, so the same model has the same
    names under every engine. A shared parameter keeps its first name.
    """
    names: dict[int, str] = {}
    for name, p in _unwrap(model).named_parameters():
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        names.setdefault(id(p), name)
    return names


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _names_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The FQN of each of the optimizer's parameters, in the optimizer's order."""
    _require_sassha(optimizer)
    names = parameter_names(model)
    result = []
    for index, p in enumerate(_optimizer_params(optimizer)):
        if id(p) not in names:
            raise ValueError(
                f"The optimizer's parameter #{index} (shape {tuple(p.shape)}) is not a parameter of the "
                "model passed in: pass the model whose parameters the optimizer was built from."
            )
        result.append(names[id(p)])
    return result


def _require_sassha(optimizer: torch.optim.Optimizer) -> None:
    from sassha_dist.optimizer import Sassha

    if not isinstance(optimizer, Sassha):
        raise TypeError(f"sassha_dist.checkpoint handles Sassha optimizers, not {type(optimizer).__name__}.")
