"""Sharded checkpoints through torch.distributed.checkpoint (DCP), with a checksummed manifest."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    set_model_state_dict,
)

from sassha_dist import schedules
from sassha_dist import state_keys as keys
from sassha_dist.checkpoint import files as checkpoint_files
from sassha_dist.checkpoint.consolidated import _check_model_keys, _plain_group
from sassha_dist.checkpoint.files import (
    _distributed,
    _fsync_dir,
    _on_rank0,
    _single_process_is_intended,
    _verify,
    _world,
)
from sassha_dist.checkpoint.fqn_state import (
    _check_groups,
    _group_names,
    load_optimizer_state_dict,
    optimizer_state_dict,
)
from sassha_dist.checkpoint.layout import (
    _PARAM_GROUPS_JSON,
    FORMAT,
    MANIFEST,
    PARAM_GROUPS,
    STATE,
    CorruptCheckpointError,
    _names_of,
    _optimizer_params,
)
from sassha_dist.functional import state_dtype


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
                files[file.name] = {"size": file.stat().st_size, "crc32": checkpoint_files.crc32(file)}
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
    counter_keys = [f"optimizer.{keys.COUNTERS}.{k}" for k in keys.COUNTER_NAMES]
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
        entry_keys = {k: f"optimizer.{STATE}.{name}.{k}" for k in keys.PER_PARAM}
        optional_keys = {k: f"optimizer.{STATE}.{name}.{k}" for k in keys.OPTIONAL_PER_PARAM}
        present = [k for k, flat in entry_keys.items() if flat in saved]
        known.update(entry_keys.values(), optional_keys.values())
        if not present:
            continue  # no state saved for this parameter (frozen, or unused so far)
        if len(present) != len(keys.PER_PARAM):
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
        "optimizer": {_PARAM_GROUPS_JSON: "", keys.COUNTERS: dict.fromkeys(keys.COUNTER_NAMES, 0)}
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
