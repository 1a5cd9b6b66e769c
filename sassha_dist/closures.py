"""The closure contract: what a closure is, and how Sassha and its drivers call one.

A closure evaluates the loss at the current parameters on the step's batch and returns it with
its graph, without calling ``backward``. A sequence of closures is a list of micro-batches whose
losses add up to the step's loss. Every pass of a step calls them through
:func:`evaluate_closure`, which checks what came back and names the mistake.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["Closure", "all_finite_flag", "as_closures", "evaluate_closure", "negated"]

#: A closure evaluates the loss at the current parameters and returns it, with
#: its graph, without calling ``backward``. A sequence of closures is a list of
#: micro-batches whose losses add up to the step's loss.
Closure = Callable[[], torch.Tensor]


def as_closures(closure: Closure | Sequence[Closure] | None) -> list[Closure]:
    """``closure`` as a non-empty list of micro-batch closures, or ``ValueError`` saying how to pass it."""
    if closure is None:
        raise ValueError(
            "Sassha needs a closure: step(closure) where closure() returns the loss at the current "
            "parameters (without calling backward). See Sassha's docstring for the pass-by-pass API."
        )
    closures = [closure] if callable(closure) else list(closure)
    if not closures or not all(callable(c) for c in closures):
        raise ValueError(
            "Invalid closure: pass a callable or a non-empty sequence of callables (micro-batches)."
        )
    return closures


def negated(closure: Closure) -> Closure:
    """The closure of the negated loss: its backward pass subtracts the gradient."""
    return lambda: -closure()


def evaluate_closure(closure: Closure) -> torch.Tensor:
    """The scalar loss ``closure()`` returns, with grad enabled; its type, shape and graph checked."""
    with torch.enable_grad():
        loss = closure()
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"The closure returned {type(loss).__name__}; it must return the loss as a tensor "
            "(do not call .item() or backward inside it)."
        )
    if loss.numel() != 1:
        raise ValueError(f"The closure returned a loss of shape {tuple(loss.shape)}; it must be a scalar.")
    if not loss.requires_grad:
        raise ValueError(
            "The closure returned a loss with no graph (requires_grad=False): it must be computed from "
            "the parameters with grad enabled, and must not be detached."
        )
    return loss.reshape(())


def all_finite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on ``tensor``'s device: no host sync until the step reads its flags."""
    return torch.isfinite(tensor).all()
