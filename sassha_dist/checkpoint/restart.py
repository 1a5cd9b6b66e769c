"""Restart-safe checkpoint directories: ``step_<n>`` published atomically, ``latest`` repointed."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sassha_dist.checkpoint.files import _on_rank0, _write_text_atomically
from sassha_dist.checkpoint.layout import _STEP_DIR, LATEST, MANIFEST, CorruptCheckpointError
from sassha_dist.checkpoint.sharded import load, save


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
        steps = _step_dirs(root)
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
    root: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    fall_back: bool = False,
) -> dict[str, Any] | None:
    """Load the checkpoint ``root/latest`` points to; returns its ``extra`` (with ``"step"``), or ``None``
    when ``root`` has no checkpoint yet (a fresh start). Collective.

    A checkpoint that fails verification raises :class:`CorruptCheckpointError` naming the bad file.
    With ``fall_back=True`` (what an unattended job wants) it is reported in a warning instead, and
    the newest older checkpoint that verifies is loaded (checkpoints are verified before anything
    is loaded, so a failed one changes nothing); the run then continues from that step, and the
    next :func:`save_checkpoint` deletes the bad one (a later step than its own).
    """
    if not fall_back:
        path = _on_rank0(lambda: latest_checkpoint(root))
        return None if path is None else load(path, model, optimizer)
    candidates = _on_rank0(lambda: _checkpoints_newest_first(root))
    if not candidates:
        return None
    for path in candidates:
        try:
            return load(path, model, optimizer)
        except CorruptCheckpointError as error:
            warnings.warn(f"{error} Loading the checkpoint before it instead.", stacklevel=2)
    tried = ", ".join(p.name for p in candidates)
    raise CorruptCheckpointError(f"No checkpoint under {root} verifies (tried {tried}): all are damaged.")


def _checkpoints_newest_first(root: str | os.PathLike) -> list[Path]:
    """The checkpoints to try, newest first: the one ``latest`` names, then the ``step_<n>`` directories
    of earlier steps by descending step (every one, if ``latest`` cannot be read)."""
    root = Path(root)
    if not root.is_dir():
        return []
    try:
        newest = latest_checkpoint(root)
    except CorruptCheckpointError as error:
        warnings.warn(f"{error} Trying the step directories instead.", stacklevel=3)
        newest = None
    steps = _step_dirs(root)[::-1]
    if newest is None:
        return [d for _, d in steps]
    newest_step = int(re.search(r"step_(\d+)", newest.name).group(1))  # step_<n>, or .step_<n>.old
    return [newest] + [d for step, d in steps if step < newest_step]


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``step_<n>`` checkpoint directory under ``root``, by step."""
    return sorted(
        (int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _STEP_DIR.match(d.name))
    )
