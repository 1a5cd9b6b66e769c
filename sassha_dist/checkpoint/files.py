"""File operations on rank 0: CRC32 manifests, atomic writes, and the process-group helpers they use."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from sassha_dist.checkpoint.layout import _CHUNK, FORMAT, MANIFEST, CorruptCheckpointError, T


def crc32(file: Path) -> int:
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
        if crc32(file) != expected["crc32"]:
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
