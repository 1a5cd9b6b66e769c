"""Preemption: a termination signal becomes a request to stop at the next step boundary.

Clusters stop jobs with a signal and a grace period: Slurm sends SIGTERM (or the
signal of ``--signal``) before it kills a job, spot instances give a short
notice, and torchrun forwards the signals it handles to every worker. Python's
default SIGTERM action kills the process wherever it is, in the middle of a
SASSHA step with the parameters at the perturbed point w + eps, or halfway
through a checkpoint.

:class:`PreemptionGuard` replaces that with a flag. The handler only records the
signal; the step in flight runs to its end (so the parameters are the updated
w, restored exactly from the perturbation by the step itself) and a save in
flight completes. At the step boundary the training loop asks
:meth:`PreemptionGuard.should_stop`, which all-reduces the flag over the
process group, so every rank stops after the same step even when the signal
reached the ranks at different moments, or only one of them. The loop then
writes one checkpoint through the restart-safe path and exits with
:data:`PREEMPTED_EXIT_CODE`, which torchrun (``--max-restarts``) restarts::

    with PreemptionGuard(("SIGTERM", "SIGUSR1")) as guard:
        for step in range(start + 1, steps + 1):
            optimizer.step(closure_for(step))
            if guard.should_stop():
                checkpoint.save_checkpoint(root, step, model, optimizer)
                raise Preempted(guard.received)

The Trainer's version is built in: :class:`sassha_dist.integrations.transformers.
SasshaTrainer` takes ``preemption_signals`` and saves through the Trainer's own
checkpointing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from sassha_dist.distributed.devices import communication_device

__all__ = ["DEFAULT_SIGNALS", "PREEMPTED_EXIT_CODE", "Preempted", "PreemptionGuard", "parse_signals"]

#: The exit status of a job that stopped on a preemption signal after saving: ``EX_TEMPFAIL``
#: of sysexits.h ("temporary failure; the user is invited to retry"). Any non-zero status
#: makes torchrun restart its workers (``--max-restarts``); this one says why.
PREEMPTED_EXIT_CODE = 75

#: The signals a guard handles unless told otherwise.
DEFAULT_SIGNALS: tuple[str, ...] = ("SIGTERM",)

#: Signals that cannot be handled, or that mean something else to a training job.
_REFUSED = {"SIGKILL", "SIGSTOP", "SIGCHLD", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"}


def parse_signals(signals: str | Iterable[str | int | signal.Signals]) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"``, ``("TERM", 10)`` or ``[signal.SIGTERM]`` as a tuple of signals.

    Names may omit the ``SIG`` prefix and ignore case; an empty string means no signal.
    """
    if isinstance(signals, str):
        items: list[str | int | signal.Signals] = [s.strip() for s in signals.split(",") if s.strip()]
    else:
        items = list(signals)
    parsed: list[signal.Signals] = []
    for item in items:
        try:
            if isinstance(item, str) and not item.lstrip("-").isdigit():
                name = item.upper() if item.upper().startswith("SIG") else "SIG" + item.upper()
                sig = signal.Signals[name]
            else:
                sig = signal.Signals(int(item))
        except (KeyError, ValueError):
            raise ValueError(
                f"Invalid preemption signal {item!r}. Must be a signal name such as SIGTERM or SIGUSR1, "
                "or its number."
            ) from None
        if sig.name in _REFUSED:
            raise ValueError(
                f"Invalid preemption signal {sig.name}: it cannot be handled or means a crash. "
                "Use SIGTERM, SIGINT, SIGHUP, SIGUSR1 or SIGUSR2."
            )
        if sig not in parsed:
            parsed.append(sig)
    return tuple(parsed)


class Preempted(SystemExit):
    """Raised once the preemption checkpoint is written; uncaught, the process exits with
    :data:`PREEMPTED_EXIT_CODE` and no traceback. ``signal`` is the signal that asked for it."""

    def __init__(self, received: signal.Signals | None = None) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signal = received

    def __str__(self) -> str:
        name = self.signal.name if self.signal is not None else "a preemption signal"
        return f"stopped on {name} after saving a checkpoint (exit status {PREEMPTED_EXIT_CODE})"


class PreemptionGuard:
    """Handles ``signals`` by recording them; :meth:`should_stop` says, on every rank alike, whether
    any rank received one.

    A context manager: entering installs the handlers (from the main thread, as Python
    requires; a guard with no signals may be entered anywhere), leaving restores the previous
    ones. ``group`` is the process group over which ranks agree (the default group); without an
    initialised process group :meth:`should_stop` is local.
    """

    def __init__(
        self,
        signals: str | Iterable[str | int | signal.Signals] = DEFAULT_SIGNALS,
        *,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.signals = parse_signals(signals)
        self.group = group
        self._received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def received(self) -> signal.Signals | None:
        """The first handled signal this process received, or ``None``."""
        return self._received

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the step or save in flight must finish, and printing here could re-enter
        # a print the main thread was in the middle of.
        if self._received is None:
            self._received = signal.Signals(signum)

    def __enter__(self) -> PreemptionGuard:
        if self.signals and threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionGuard must be entered from the main thread (Python runs signal handlers "
                "there only). Enter it around the training loop in the main thread."
            )
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self) -> bool:
        """Whether any rank received a handled signal. Collective over ``group`` when a process group
        is initialised: call it on every rank at the same point of every step."""
        stop = self._received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return stop
        flag = torch.tensor([int(stop)], dtype=torch.int32, device=communication_device(group=self.group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
