"""Timing, device and table helpers shared by the benchmarks.

Every comparison runs side by side in one process: contestants take turns in
rounds, the order reversed every other round (A B C, C B A, ...), so slow drift
and bursts of load from other processes hit all of them alike. A contestant's
time is the median over rounds of its per-step time in that round, and results
are printed as ratios to a baseline measured in the same rounds.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DTYPES",
    "Contestant",
    "autocast_context",
    "format_table",
    "interleaved_times",
    "machine_description",
    "resolve_device",
    "synchronize",
]

#: ``--dtype`` choices: ``fp32``, or ``bf16`` autocast with fp32 parameters (mixed precision).
DTYPES = ("fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; a clear error where CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: must be cpu or cuda.")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (fp32 parameters and optimizer state) or nothing."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype != "fp32":
        raise ValueError(f"Invalid dtype={dtype!r}. Must be one of {DTYPES}.")
    return contextlib.nullcontext()


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()}, {os.cpu_count()} cores"
    return f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Contestant:
    """A named thing to time; ``run(n)`` performs ``n`` steps (it need not synchronise)."""

    name: str
    run: Callable[[int], None]


def interleaved_times(
    contestants: Sequence[Contestant],
    *,
    rounds: int,
    steps_per_round: int,
    device: torch.device,
    warmup_rounds: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per step of each contestant, one entry per timed round.

    Round ``r`` runs the contestants in order, reversed when ``r`` is odd. Each
    round of a contestant is ``steps_per_round`` steps between two device
    synchronisations; warm-up rounds are run the same way and discarded.
    """
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"Invalid {rounds=} or {steps_per_round=}. Both must be >= 1.")
    times: dict[str, list[float]] = {c.name: [] for c in contestants}
    for r in range(warmup_rounds + rounds):
        order = list(contestants) if r % 2 == 0 else list(reversed(contestants))
        for contestant in order:
            synchronize(device)
            start = time.perf_counter()
            contestant.run(steps_per_round)
            synchronize(device)
            elapsed = (time.perf_counter() - start) / steps_per_round
            if r >= warmup_rounds:
                times[contestant.name].append(elapsed)
        if progress is not None:
            label = "warm-up" if r < warmup_rounds else f"{r - warmup_rounds + 1}/{rounds}"
            progress(f"round {label} done")
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """Half the interquartile range over the median: a robust relative spread."""
    if len(values) < 4:
        return (max(values) - min(values)) / (2 * statistics.median(values))
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / (2 * statistics.median(values))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown pipe table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
