"""Random-number replay: every pass of one step draws the same random numbers.

A SASSHA step evaluates the same loss several times: at θ, at θ + ε, and for finite-difference
Hessians at w ± hz. A model with dropout draws a new mask on every forward pass, which is
harmless for the gradients but ruins a finite difference of two gradients: the difference is
then mask noise divided by ``2h`` (measured: 147x the Hessian diagonal with dropout 0.1, SPEC
§2). :class:`RngReplay` records the generator states before a micro-batch's first pass and
restores them before each later pass, the way activation checkpointing replays its forward, so
every pass sees the masks of the first one. After the step the generators stand where one pass
would have left them.

Replayed: the CPU generator and, where CUDA is initialised, the generator of every CUDA device
that holds a parameter (and the current one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["RngReplay"]

_State = tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]


class RngReplay:
    """Replays the random-number state per micro-batch across the passes of one step."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        devices: set[int] = set()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices = {
                t.device.index for t in tensors if t.device.type == "cuda" and t.device.index is not None
            }
            devices.add(torch.cuda.current_device())
        self._cuda_devices = sorted(devices)
        self._before: list[_State] = []
        self._after: _State | None = None

    def _capture(self) -> _State:
        cuda = [(d, torch.cuda.get_rng_state(d)) for d in self._cuda_devices]
        return torch.get_rng_state(), cuda

    @staticmethod
    def _restore(state: _State) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        for device, device_state in cuda:
            torch.cuda.set_rng_state(device_state, device)

    @contextmanager
    def around(self, index: int) -> Iterator[None]:
        """Run micro-batch ``index``'s forward pass: recorded the first time, replayed afterwards."""
        if index < len(self._before):
            self._restore(self._before[index])
            yield
            return
        if index != len(self._before):
            raise RuntimeError(f"RngReplay: micro-batch {index} before micro-batch {len(self._before)}.")
        self._before.append(self._capture())
        yield
        self._after = self._capture()

    def finish(self) -> None:
        """Leave the generators where the first pass over all micro-batches left them."""
        if self._after is not None:
            self._restore(self._after)
