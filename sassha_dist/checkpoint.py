"""Checkpoints keyed by parameter name: sharded (DCP), consolidated, and restart-safe.

Three layers, each usable on its own:

* **FQN-keyed state** (in memory). :func:`optimizer_state_dict` returns the
  optimizer's ``m``, ``D`` and per-parameter counters keyed by each
  parameter's fully-qualified name in the model (``"0.weight"``), not by its
  position, plus the param groups (names instead of indices) and the
  optimizer-wide counters (global step, Hessian refreshes = probe position,
  skipped steps)::

      {"state": {fqn: {"momentum": T, "hessian_diag": T, "step": t, "hessian_updates": t}},
       "param_groups": [{"lr": ..., ..., "params": [fqn, ...]}],
       "sassha_counters": {"global_step": n, "hessian_refreshes": n, "skipped_steps": n}}

  ``T`` is a DTensor of the parameter's placement under FSDP2 and a plain
  tensor elsewhere. :func:`load_optimizer_state_dict` loads it into an
  optimizer over the same named parameters under any engine: DTensors and
  full tensors are converted to the new parameters' layout, and everything is
  validated (another optimizer, another model) before
  :meth:`Sassha.load_state_dict` installs it, so ``m`` and ``D`` keep their
  fp32 precision. (torch's ``get_optimizer_state_dict`` is not used: to
  initialise empty state it calls ``optimizer.step()`` without a closure,
  which Sassha refuses.)

* **Sharded checkpoints** through ``torch.distributed.checkpoint`` (DCP).
  :func:`save` writes the model (``get_model_state_dict``) and the FQN-keyed
  optimizer state, each rank its own shards. :func:`load` first creates any
  missing optimizer state in the *new* parameters' placement (lazy state),
  then lets DCP read into it, so a checkpoint saved at W ranks resumes at any
  other W, or under DDP or on one device. With global probes
  (``probe_mode="global"``, the default under FSDP2) the resumed run continues
  the same trajectory, since probes do not depend on W.

* **Consolidated state** (:func:`full_state_dict`, :func:`load_full_state_dict`,
  :func:`export_full`, :func:`import_full`): the model and optimizer state
  gathered into plain CPU tensors on rank 0, keyed by FQN
  (``{"model": {fqn: tensor}, "optimizer": <the layout above>}``), to move a
  run from one engine to another (FSDP2 -> DDP -> one device -> FSDP2). It is
  the interchange format for engines whose optimizer sees flat partitions
  (DeepSpeed ZeRO): an exporter for them only has to produce this layout.

**Restart safety.** A checkpoint directory is written under a temporary
name, checksummed into a manifest (``sassha_manifest.json``, written last), and
only then renamed into place; :func:`save_checkpoint` then points ``latest``
at it with ``os.replace``. A crash at any moment leaves ``latest`` on the
previous complete checkpoint. :func:`load` verifies every file's size and
CRC32 against the manifest and raises :class:`CorruptCheckpointError` naming
the file that is missing, truncated or damaged. A training loop::

    resumed = checkpoint.load_latest(root, model, optimizer)  # None on a fresh start
    start = 0 if resumed is None else resumed["step"]
    for step in range(start + 1, steps + 1):
        optimizer.step(closure_for(step))
        if step % every == 0:
            checkpoint.save_checkpoint(root, step, model, optimizer)

Notes:

* All functions that take a model are collective when a process group is
  initialised: call them on every rank. Rank 0 does the file operations, so
  every rank must see the same directory (a shared filesystem, as DCP's
  ``FileSystemWriter`` needs anyway).
* The probe of a parameter depends on its position in the optimizer: build
  the resumed optimizer over the parameters in the same order (for example
  from ``model.parameters()`` again) to continue the same probe stream.
* Under ``torchrun --max-restarts N`` with torch >= 2.5, a restarted attempt can
  read the previous attempt's gloo/NCCL addresses from the shared rendezvous
  store (pytorch/pytorch#135712). ``tests/restart_job.py`` shows the fix: a
  ``PrefixStore`` per ``TORCHELASTIC_RESTART_COUNT``. Setting
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` also avoids it, but then the store
  dies with rank 0 and other ranks can abort at exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from sassha_dist import schedules
from sassha_dist import state_keys as keys
from sassha_dist.functional import state_dtype

__all__ = [
    "MANIFEST",
    "CorruptCheckpointError",
    "export_full",
    "full_state_dict",
    "import_full",
    "latest_checkpoint",
    "load",
    "load_full_state_dict",
    "load_latest",
    "load_optimizer_state_dict",
    "optimizer_state_dict",
    "parameter_names",
    "save",
    "save_checkpoint",
]

#: Written last into a checkpoint directory: the format, each file's size and CRC32, and ``extra``.
MANIFEST = "sassha_manifest.json"
#: In a checkpoint root: the name of the newest complete checkpoint directory.
LATEST = "latest"
FORMAT = "sassha_dist.checkpoint/1"

STATE = "state"
PARAM_GROUPS = "param_groups"
_PARAM_GROUPS_JSON = "param_groups_json"  # DCP stores the groups as one JSON string
_PER_PARAM_KEYS = (keys.MOMENTUM, keys.HESSIAN_DIAG, keys.STEP, keys.HESSIAN_UPDATES)
#: Saved since the authors' frozen bias correction; older checkpoints lack them (Sassha derives them).
_OPTIONAL_PER_PARAM_KEYS = (keys.HESSIAN_CORRECTION, keys.HESSIAN_CORRECTION_POWER)
_COUNTER_KEYS = (keys.GLOBAL_STEP, keys.HESSIAN_REFRESHES, keys.SKIPPED_STEPS)
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 22

T = TypeVar("T")


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or damaged (the message names the file)."""


# -- parameter names ------------------------------------------------------------------------------


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


# -- FQN-keyed optimizer state ----------------------------------------------------------------------


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
        index_to_name[index]: {k: entry[k] for k in _PER_PARAM_KEYS + _OPTIONAL_PER_PARAM_KEYS if k in entry}
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
    if not isinstance(counters, Mapping) or any(k not in counters for k in _COUNTER_KEYS):
        raise ValueError(
            f"Invalid Sassha optimizer state: {keys.COUNTERS} must hold {list(_COUNTER_KEYS)}, "
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
        missing = [k for k in _PER_PARAM_KEYS if k not in saved]
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
            keys.STEP: torch.as_tensor(saved[keys.STEP], dtype=torch.float32).detach().cpu(),
            keys.HESSIAN_UPDATES: torch.as_tensor(saved[keys.HESSIAN_UPDATES], dtype=torch.float32)
            .detach()
            .cpu(),
            **{
                k: torch.as_tensor(saved[k], dtype=torch.float64).detach().cpu()
                for k in _OPTIONAL_PER_PARAM_KEYS
                if k in saved
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


# -- consolidated state ------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: one process is a supported case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


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


# -- sharded checkpoints (DCP) ------------------------------------------------------------------------


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    optim = optimizer_state_dict(model, optimizer)
    try:
        groups = json.dumps([_plain_group(g) for g in optim[PARAM_GROUPS]])
    except TypeError as error:
        raise TypeError(
            f"Param group values must be JSON-serialisable to be checkpointed: {error}"
        ) from error
    return {
        "model": get_model_state_dict(model),
        "optimizer": {STATE: optim[STATE], _PARAM_GROUPS_JSON: groups, keys.COUNTERS: optim[keys.COUNTERS]},
    }


def save(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save a sharded checkpoint (model and optimizer) to the directory ``path``. Collective.

    Each rank writes its own shards through DCP into ``.<name>.tmp`` next to
    ``path``; rank 0 then writes the manifest (every file's size and CRC32 and
    the JSON-serialisable ``extra``) and renames the directory to ``path``, so
    ``path`` is either absent, the previous checkpoint, or complete. Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    extra = dict(extra or {})
    json.dumps(extra)  # fail before writing anything if extra is not JSON-serialisable
    state = _dcp_state(model, optimizer)

    def prepare() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that crashed
            shutil.rmtree(tmp)
        tmp.mkdir()

    _on_rank0(prepare)
    with _single_process_is_intended():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not _distributed())

    def publish() -> None:
        files = {}
        for file in sorted(tmp.iterdir()):
            if file.is_file():
                files[file.name] = {"size": file.stat().st_size, "crc32": _crc32(file)}
        manifest = {"format": FORMAT, "world_size": _world(), "files": files, "extra": extra}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():  # replace: move the old one aside, publish, then delete it
            if old.exists():
                shutil.rmtree(old)
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        if old.exists():  # also one left by a replace that crashed between the two renames
            shutil.rmtree(old)

    _on_rank0(publish)
    return path


def load(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` into ``model`` and ``optimizer``; returns its ``extra``.

    The checkpoint may come from any world size and engine. Files are verified
    against the manifest first (:class:`CorruptCheckpointError` names the bad
    file); a checkpoint of another model or optimizer raises ``ValueError``
    before anything is changed. Collective.
    """
    path = Path(path)
    manifest = _on_rank0(lambda: _verify(path))
    try:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as error:
        raise CorruptCheckpointError(f"Cannot read the DCP metadata {path / '.metadata'}: {error}") from error
    names = _names_of(model, optimizer)
    params = dict(zip(names, _optimizer_params(optimizer), strict=True))
    _check_model_keys(
        model,
        {k[len("model.") :]: getattr(v, "size", None) for k, v in saved.items() if k.startswith("model.")},
        f"the checkpoint {path}",
    )
    counter_keys = [f"optimizer.{keys.COUNTERS}.{k}" for k in _COUNTER_KEYS]
    groups_key = f"optimizer.{_PARAM_GROUPS_JSON}"
    if not all(k in saved for k in [*counter_keys, groups_key]):
        optimizer_keys = sorted(k for k in saved if k.startswith("optimizer."))
        raise ValueError(
            f"The checkpoint {path} holds no Sassha optimizer state (no {keys.COUNTERS}; its optimizer "
            f"entries are {optimizer_keys[:6]}); was it saved by another optimizer?"
        )
    template_state: dict[str, dict[str, Any]] = {}
    known = {*counter_keys, groups_key}
    for name, p in params.items():
        entry_keys = {k: f"optimizer.{STATE}.{name}.{k}" for k in _PER_PARAM_KEYS}
        optional_keys = {k: f"optimizer.{STATE}.{name}.{k}" for k in _OPTIONAL_PER_PARAM_KEYS}
        present = [k for k, flat in entry_keys.items() if flat in saved]
        known.update(entry_keys.values(), optional_keys.values())
        if not present:
            continue  # no state saved for this parameter (frozen, or unused so far)
        if len(present) != len(_PER_PARAM_KEYS):
            raise ValueError(
                f"The checkpoint {path} has incomplete state for {name!r}: {present}; "
                "was it saved by another optimizer?"
            )
        shape = tuple(getattr(saved[entry_keys[keys.MOMENTUM]], "size", ()))
        if shape != tuple(p.shape):
            raise ValueError(
                f"The checkpoint {path} has state of shape {shape} for {name!r}, a parameter of shape "
                f"{tuple(p.shape)}; was it saved for another model?"
            )
        dtype = state_dtype(p.dtype)
        # Lazy state: allocate in the new parameter's placement so DCP reshards into it.
        template_state[name] = {
            keys.MOMENTUM: torch.zeros_like(p, dtype=dtype),
            keys.HESSIAN_DIAG: torch.zeros_like(p, dtype=dtype),
            keys.STEP: torch.zeros((), dtype=torch.float32),
            keys.HESSIAN_UPDATES: torch.zeros((), dtype=torch.float32),
            **{k: torch.zeros((), dtype=torch.float64) for k, flat in optional_keys.items() if flat in saved},
        }
    unknown = sorted(k for k in saved if k.startswith("optimizer.") and k not in known)
    if unknown:
        raise ValueError(
            f"The checkpoint {path} has optimizer entries this model's optimizer does not know: "
            f"{unknown[:5]}; was it saved for another model?"
        )
    # Stage 1, small: the param groups, checked before anything is read into the model.
    head: dict[str, Any] = {
        "optimizer": {_PARAM_GROUPS_JSON: "", keys.COUNTERS: dict.fromkeys(_COUNTER_KEYS, 0)}
    }
    _dcp_load(head, path)
    groups = _groups_from_json(head["optimizer"][_PARAM_GROUPS_JSON], path)
    _check_groups(groups, _group_names(optimizer, names))
    # Stage 2: model and optimizer state, resharded into this run's layout.
    state = {"model": get_model_state_dict(model), "optimizer": {STATE: template_state}}
    _dcp_load(state, path)
    load_optimizer_state_dict(
        model,
        optimizer,
        {
            STATE: state["optimizer"][STATE],
            PARAM_GROUPS: groups,
            keys.COUNTERS: head["optimizer"][keys.COUNTERS],
        },
    )
    set_model_state_dict(model, state["model"])
    return dict(manifest.get("extra", {}))


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    try:
        with _single_process_is_intended():
            dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=not _distributed())
    except Exception as error:
        raise CorruptCheckpointError(f"Cannot load the checkpoint {path}: {error}") from error


def _groups_from_json(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        groups = json.loads(text)
    except (TypeError, ValueError) as error:
        raise CorruptCheckpointError(f"The param groups stored in {path} are damaged: {error}") from error
    if not isinstance(groups, list):
        raise CorruptCheckpointError(f"The param groups stored in {path} are damaged: {groups!r}.")
    # JSON has no tuples: give betas (and any other pair) back its tuple.
    return [
        {
            k: (tuple(v) if isinstance(v, list) and k != "params" else schedules.from_json(v))
            for k, v in group.items()
        }
        for group in groups
    ]


# -- restart-safe checkpoint directories ----------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: Mapping[str, Any] | None = None,
    keep: int | None = 2,
) -> Path:
    """Save ``root/step_<step>`` with :func:`save`, then point ``root/latest`` at it. Collective.

    ``latest`` is replaced atomically (``os.replace``) only after the
    directory is complete, so a crash at any point leaves ``latest`` on the
    previous complete checkpoint. Afterwards rank 0 keeps the ``keep`` newest
    checkpoints up to ``step`` and deletes any with a later step (left by an
    attempt that crashed after saving them and was resumed from an earlier one).
    ``extra`` is stored with ``"step": step`` added; :func:`load_latest` returns it.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"Invalid {step=}. Must be an int >= 0.")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"Invalid {keep=}. Must be an int >= 1, or None to keep every checkpoint.")
    root = Path(root)
    name = f"step_{step:08d}"
    path = save(root / name, model, optimizer, extra={**(extra or {}), "step": step})

    def point_and_prune() -> None:
        _write_text_atomically(root / LATEST, name + "\n")
        steps = sorted(
            (int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _STEP_DIR.match(d.name))
        )
        older = [d for s, d in steps if s <= step]
        doomed = [d for s, d in steps if s > step]
        if keep is not None:
            doomed += older[:-keep]
        for d in doomed:
            shutil.rmtree(d, ignore_errors=True)

    _on_rank0(point_and_prune)
    return path


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The directory ``root/latest`` points to, or ``None`` when there is no ``latest`` yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.match(name):
        raise CorruptCheckpointError(f"{pointer} does not name a checkpoint directory: {name!r}.")
    path = root / name
    if not path.is_dir():
        old = root / f".{name}.old"  # a replace of this step crashed between its two renames
        if (old / MANIFEST).is_file():
            return old
        raise CorruptCheckpointError(f"{pointer} points to {path}, which does not exist.")
    return path


def load_latest(
    root: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Load the checkpoint ``root/latest`` points to; returns its ``extra`` (with ``"step"``), or ``None``
    when ``root`` has no checkpoint yet (a fresh start). Collective."""
    path = _on_rank0(lambda: latest_checkpoint(root))
    if path is None:
        return None
    return load(path, model, optimizer)


# -- files ----------------------------------------------------------------------------------------------


def _crc32(file: Path) -> int:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _verify(path: Path) -> dict[str, Any]:
    """Check every file of the checkpoint at ``path`` against its manifest; return the manifest."""
    if not path.is_dir():
        raise FileNotFoundError(f"No checkpoint directory at {path}.")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CorruptCheckpointError(
            f"{manifest_file} is missing: {path} is not a complete sassha_dist checkpoint "
            "(a save that did not finish, or not written by sassha_dist.checkpoint.save)."
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except Exception as error:
        raise CorruptCheckpointError(f"{manifest_file} is damaged: {error}") from error
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpointError(f"Checkpoint file {file} is missing.")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CorruptCheckpointError(
                f"Checkpoint file {file} is truncated or damaged: {size} bytes, the manifest says "
                f"{expected['size']}."
            )
        if _crc32(file) != expected["crc32"]:
            raise CorruptCheckpointError(
                f"Checkpoint file {file} is corrupt: its CRC32 does not match the manifest."
            )
    return manifest


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give every rank its result, or raise its exception on every rank."""
    if _world() == 1:
        return fn()
    outcome: list[Any] = [None]
    if _rank() == 0:
        try:
            outcome[0] = ("ok", fn())
        except Exception as error:
            outcome[0] = ("error", error)
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise value
    return value
