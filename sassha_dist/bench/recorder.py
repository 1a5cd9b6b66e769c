"""The recorder behind ``memory-comm`` and ``cost-model --check``: collectives and live memory.

:class:`Recorder` is a ``TorchDispatchMode`` that, while active on one rank, counts every
collective (kind, payload, bytes sent per rank) and follows live tensor storage to its peak.
It sits in its own module so that both benchmarks use it without importing each other.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KINDS", "SCALAR_ELEMENTS", "Recorder", "classify", "sent_bytes", "summarize_calls"]

SCALAR_ELEMENTS = 64
KINDS = ("grad_reduction", "param_gather", "scalar")

# -- collective counting ------------------------------------------------------------------

_ALL_GATHER = {"allgather_", "_allgather_base_", "allgather_into_tensor_coalesced_", "allgather_coalesced_"}
_REDUCE_SCATTER = {"reduce_scatter_", "_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"}
_ALL_REDUCE = {"allreduce_", "allreduce_coalesced_"}
_ROOTED = {"reduce_": "reduce", "broadcast_": "broadcast"}
_FUNCTIONAL = {
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "broadcast": "broadcast",
    "broadcast_": "broadcast",
}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _nbytes(obj: Any) -> tuple[int, int]:
    tensors = _tensors(obj)
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors)


def _collective(func: Any, args: tuple, world: int) -> tuple[str, int, int] | None:
    """``(collective, payload bytes, payload elements)`` of a c10d op, or None for other ops."""
    namespace, name = func.namespace, func._schema.name.split("::", 1)[1]
    if namespace == "c10d":
        if name in _ALL_GATHER:
            return ("all_gather", *_nbytes(args[0]))
        if name in _REDUCE_SCATTER:
            return ("reduce_scatter", *_nbytes(args[1]))
        if name in _ALL_REDUCE:
            return ("all_reduce", *_nbytes(args[0]))
        if name in _ROOTED:
            return (_ROOTED[name], *_nbytes(args[0]))
        if name in ("barrier", "monitored_barrier_"):
            return ("barrier", 0, 0)
        if name in (
            "send",
            "recv_",
            "recv_any_source_",
            "alltoall_",
            "alltoall_base_",
            "gather_",
            "scatter_",
        ):
            return (name.rstrip("_"), *_nbytes(args[0]))
        return None
    if namespace == "_c10d_functional" and name in _FUNCTIONAL:
        kind = _FUNCTIONAL[name]
        size, numel = _nbytes(args[0])
        if kind == "all_gather":
            size, numel = size * world, numel * world
        return (kind, size, numel)
    return None


def sent_bytes(collective: str, payload: float, world: int) -> float:
    """Bytes each rank sends for a payload (full tensor) of ``payload`` bytes, ring algorithms."""
    share = (world - 1) / world
    if collective == "all_reduce":
        return 2 * share * payload
    if collective in ("all_gather", "reduce_scatter", "reduce", "broadcast"):
        return share * payload
    return 0.0


def classify(collective: str, numel: int) -> str:
    if numel <= SCALAR_ELEMENTS:
        return "scalar"
    if collective in ("all_gather", "broadcast"):
        return "param_gather"
    return "grad_reduction"


class Recorder(TorchDispatchMode):
    """Records collectives and live tensor storage while active (one rank, one contestant).

    * Collectives: every ``c10d`` / ``_c10d_functional`` op as ``(collective,
      payload bytes, elements)`` into :attr:`calls` while :attr:`counting`.
    * Memory (``track_memory``): every storage an op returns (a DTensor's
      local storage) is counted once, keyed by its ``StorageImpl``, until a
      weakref finalizer sees it die, whichever thread frees it (gloo's worker
      threads free tensors the main thread allocated). Storage resizes (FSDP2
      frees and re-allocates unsharded parameters with ``resize_``) are
      followed through a wrapper of ``torch.UntypedStorage.resize_``.
      :attr:`live` is the total and :attr:`peak` its maximum since
      :meth:`reset_peak`. Not seen: memory allocated outside dispatched ops
      (the communication libraries' own buffers, temporaries inside a c10d
      op or inside DTensor's dispatch).
    """

    _active: Recorder | None = None

    def __init__(self, world_size: int, track_memory: bool = True) -> None:
        super().__init__()
        self.world_size = world_size
        self.track_memory = track_memory
        self.counting = False
        self.calls: list[tuple[str, int, int]] = []
        self.storages: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._lock = threading.RLock()

    def __enter__(self) -> Recorder:
        Recorder._active = self
        _install_resize_hook()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        Recorder._active = None
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            found = _collective(func, args, self.world_size)
            if found is not None:
                self.calls.append(found)
        out = func(*args, **(kwargs or {}))
        if self.track_memory:
            for t in _tensors(out):
                self._track(t)
        return out

    def reset_peak(self) -> int:
        with self._lock:
            self.peak = self.live
            return self.live

    def _track(self, t: torch.Tensor) -> None:
        local = getattr(t, "_local_tensor", t)
        if local.device.type not in ("cpu", "cuda") or local.layout != torch.strided:
            return
        try:
            storage = local.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage._cdata
        with self._lock:
            if key in self.storages:
                return
            size = storage.nbytes()
            self.storages[key] = size
            self._add(size)
        weakref.finalize(storage, self._free, key)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        key, size = storage._cdata, storage.nbytes()
        with self._lock:
            if key in self.storages:
                self._add(size - self.storages[key])
                self.storages[key] = size
                return
            self.storages[key] = size
            self._add(size)
        weakref.finalize(storage, self._free, key)

    def _add(self, size: int) -> None:
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        with self._lock:
            self.live -= self.storages.pop(key, 0)


_ORIGINAL_RESIZE = None


def _install_resize_hook() -> None:
    """Let the active :class:`Recorder` follow ``UntypedStorage.resize_`` (installed once per process)."""
    global _ORIGINAL_RESIZE
    if _ORIGINAL_RESIZE is not None:
        return
    _ORIGINAL_RESIZE = torch.UntypedStorage.resize_

    def resize_(self, size):
        result = _ORIGINAL_RESIZE(self, size)
        recorder = Recorder._active
        if recorder is not None and recorder.track_memory:
            recorder._resized(self)
        return result

    torch.UntypedStorage.resize_ = resize_


def summarize_calls(calls: list[tuple[str, int, int]], world: int) -> dict[str, Any]:
    """Per kind: count, payload bytes and bytes sent per rank; and per collective."""
    out: dict[str, Any] = {kind: {"count": 0, "payload": 0.0, "sent": 0.0} for kind in KINDS}
    by_op: dict[str, dict[str, float]] = {}
    for collective, size, numel in calls:
        if collective == "barrier":
            continue
        kind = classify(collective, numel)
        sent = sent_bytes(collective, size, world)
        for bucket in (
            out[kind],
            by_op.setdefault(f"{kind}:{collective}", {"count": 0, "payload": 0.0, "sent": 0.0}),
        ):
            bucket["count"] += 1
            bucket["payload"] += size
            bucket["sent"] += sent
    out["by_op"] = by_op
    return out
