"""What the quality benchmarks share: declared tuning grids, schedules, statistics, sharpness.

A tuning grid is a base configuration and a list of stages. Stage 1 tries
each of its overrides on the base; every later stage tries its overrides on
the best configuration so far (so ``[[lr...], [rho...]]`` tunes the learning
rate, then the radius at the best learning rate). The best configuration over
all trials wins. Trials run on seed 0 and are judged on a tuning split that
the reported numbers never use.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Grid",
    "Schedule",
    "Trial",
    "hessian_max_eigenvalue",
    "mean_std",
    "tune",
    "warmup_cosine",
]


@dataclass(frozen=True)
class Grid:
    """A base configuration and stages of overrides (see the module docstring)."""

    base: dict[str, Any]
    stages: tuple[tuple[dict[str, Any], ...], ...]

    def size(self) -> int:
        return sum(len(stage) for stage in self.stages)

    def describe(self) -> str:
        fixed = ", ".join(f"{k}={_fmt(v)}" for k, v in self.base.items() if not _tuned(k, self.stages))
        parts = []
        for i, stage in enumerate(self.stages):
            keys = sorted({k for override in stage for k in override})
            values = "; ".join(", ".join(_fmt(o[k]) for o in stage if k in o) for k in keys)
            if i == 0:
                later = [k for k in self.base if k not in keys and _tuned(k, self.stages)]
                where = f" at {', '.join(f'{k}={_fmt(self.base[k])}' for k in later)}" if later else ""
            else:
                where = " at the best so far"
            parts.append(f"{'/'.join(keys)} in {{{values}}}{where}")
        return "; then ".join(parts) + (f" (fixed: {fixed})" if fixed else "")

    def center(self) -> Grid:
        """The base configuration only, for smoke tests."""
        return Grid(self.base, ())


def _tuned(key: str, stages: tuple[tuple[dict[str, Any], ...], ...]) -> bool:
    return any(key in override for stage in stages for override in stage)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


@dataclass
class Trial:
    hparams: dict[str, Any]
    score: float
    metrics: dict[str, Any] = field(default_factory=dict)


def tune(
    grid: Grid,
    evaluate: Callable[[dict[str, Any]], tuple[float, dict[str, Any]]],
    *,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], list[Trial]]:
    """Run the grid; ``evaluate(hparams) -> (score, metrics)``, lower is better.

    Returns the best configuration and every trial.
    """
    trials: list[Trial] = []
    seen: dict[tuple, Trial] = {}

    def attempt(hparams: dict[str, Any]) -> Trial:
        key = tuple(sorted((k, repr(v)) for k, v in hparams.items()))
        if key not in seen:
            score, metrics = evaluate(hparams)
            if not math.isfinite(score):
                score = math.inf
            seen[key] = Trial(dict(hparams), score, metrics)
            trials.append(seen[key])
            if log is not None:
                log(f"trial {_short(hparams)}: {score:.4g}")
        return seen[key]

    best = attempt(dict(grid.base)) if not grid.stages else None
    for stage in grid.stages:
        start = dict(grid.base) if best is None else dict(best.hparams)
        for override in stage:
            trial = attempt({**start, **override})
            if best is None or trial.score < best.score:
                best = trial
    assert best is not None
    return dict(best.hparams), trials


def _short(hparams: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in hparams.items() if k in ("lr", "rho", "weight_decay"))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values: Sequence[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def warmup_cosine(
    total_steps: int, warmup_fraction: float = 0.05, floor: float = 0.1, *, warmup_steps: int | None = None
) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine down to ``floor`` at ``total_steps``.

    The warm-up lasts ``warmup_steps`` if given (at most half the run), else
    ``warmup_fraction`` of the steps.
    """
    if warmup_steps is None:
        warmup = max(1, round(warmup_fraction * total_steps))
    else:
        warmup = max(1, min(warmup_steps, total_steps // 2))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Schedule:
    """``LambdaLR`` without its bookkeeping: sets each group's lr to ``base * factor(t)``.

    torch's schedulers warn when ``optimizer.step`` was not called, which is
    the case when SASSHA runs pass by pass (to clip its perturbed gradient).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> None:
        self.optimizer, self.factor, self.t = optimizer, factor, 0
        self.base = [group["lr"] for group in optimizer.param_groups]
        self._apply()

    def step(self) -> None:
        self.t += 1
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * self.factor(self.t)


def hessian_max_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    iterations: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Largest-magnitude Hessian eigenvalue of ``loss_fn()`` at ``params`` by power iteration with exact HVPs.

    Each iteration is one double backward through a graph built once. Stops when
    the Rayleigh quotient changes by less than ``tol`` (relative).
    """
    params = [p for p in params if p.requires_grad]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    eigenvalue = 0.0
    for _ in range(iterations):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        new = float(sum((h * x).sum() for h, x in zip(hv, v)))
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        if float(norm) == 0.0:
            return 0.0
        v = [h.detach() / norm for h in hv]
        if eigenvalue and abs(new - eigenvalue) <= tol * abs(eigenvalue):
            eigenvalue = new
            break
        eigenvalue = new
    return eigenvalue
