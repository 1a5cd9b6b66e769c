"""Where a collective's own tensors must live: on the device the process group communicates on.

NCCL (and XCCL) communicate device tensors only, while gloo also accepts CPU tensors, so a
tensor built without a device (``torch.tensor(count)``) works in every CPU test and fails on
the first GPU run. Every tensor SASSHA hands to ``torch.distributed`` itself (a norm, an element
count, the finiteness flags) goes through :func:`communication_device` first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["communication_device", "group_device_types"]


def group_device_types(group: dist.ProcessGroup | None = None) -> tuple[str, ...]:
    """The device types ``group``'s backend communicates (``("cuda",)`` for NCCL); empty if unknown.

    Read from the public backend name: ``"nccl"``, ``"gloo"``, or a ``"cpu:gloo,cuda:nccl"`` map.
    """
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:
        return tuple(pair.split(":", 1)[0].strip() for pair in backend.split(","))
    return tuple(dist.Backend.backend_capability.get(backend, ()))


def _current_device(device_type: str) -> torch.device:
    """This process's current device of ``device_type`` (``cuda:<current>``), or the CPU."""
    if device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, device_type, None)
    if module is not None and hasattr(module, "current_device"):
        return torch.device(device_type, module.current_device())
    return torch.device(device_type)


def communication_device(
    tensors: Iterable[torch.Tensor] = (), group: dist.ProcessGroup | None = None
) -> torch.device:
    """The device for a collective over ``group`` whose values come from ``tensors``.

    The first tensor's device (the parameters', which the engine already communicates on) when
    the group's backend communicates that device type; otherwise (no tensor, or CPU tensors under
    NCCL) the group's own device, the current CUDA device for NCCL. Without an initialised
    process group: the first tensor's device, else the CPU.
    """
    device = next((t.device for t in tensors), None)
    if not (dist.is_available() and dist.is_initialized()):
        return device if device is not None else torch.device("cpu")
    types = group_device_types(group)
    if device is not None and (not types or device.type in types):
        return device
    if not types or "cpu" in types:
        return torch.device("cpu")
    return _current_device(types[0])
