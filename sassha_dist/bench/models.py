"""Models, batches and the optimizers the benchmarks compare.

* :func:`gpt2_config`: ``tiny`` (2 layers, ``n_embd`` 64, 2 heads, byte
  vocabulary of 258, ~125k parameters; the same shape as
  ``sassha_dist.integrations.embedded.tiny_gpt2_config``), ``small`` (4
  layers, ``n_embd`` 256, 4 heads, the byte vocabulary, ~3.3M parameters: on a
  CPU, tensors large enough that per-tensor overhead no longer dominates) or
  ``gpt2-small`` (GPT-2 small's shape: 12 layers, ``n_embd`` 768, 50257 tokens,
  ~124M parameters). Dropout is off in all, so every pass of a step sees the same
  function. Both are initialised from scratch. Attention is ``eager`` by
  default: exact Hessian-vector products need a double backward, which torch's
  fused SDPA kernels (flash, memory-efficient) do not implement.
* :class:`SamAdamW`: SAM (Foret et al., ICLR 2021) around AdamW, with SASSHA's
  closure contract.
* :func:`build_optimizer` and :func:`train_step`: one interface for AdamW,
  SAM-AdamW and SASSHA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from sassha_dist import Sassha
from sassha_dist.options import PERTURB_MOMENTUM

__all__ = [
    "MODEL_SIZES",
    "OPTIMIZERS",
    "SamAdamW",
    "build_lm",
    "build_optimizer",
    "gpt2_config",
    "random_token_batches",
    "train_step",
]

MODEL_SIZES = ("tiny", "small", "gpt2-small")
OPTIMIZERS = ("adamw", "sam-adamw", "sassha", "msassha")

_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def gpt2_config(size: str = "tiny", **overrides: Any):
    """A ``GPT2Config`` of the named size (see the module docstring), dropout off."""
    from transformers import GPT2Config

    if size == "tiny":
        settings = {"vocab_size": 258, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 2}
        settings.update(bos_token_id=256, eos_token_id=256)
    elif size == "small":
        settings = {"vocab_size": 258, "n_positions": 256, "n_embd": 256, "n_layer": 4, "n_head": 4}
        settings.update(bos_token_id=256, eos_token_id=256)
    elif size == "gpt2-small":
        settings = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
    else:
        raise ValueError(f"Invalid model size {size!r}. Must be one of {MODEL_SIZES}.")
    settings.update(_NO_DROPOUT, attn_implementation="eager")
    settings.update(overrides)
    return GPT2Config(**settings)


def build_lm(size: str = "tiny", *, seed: int = 0, device: torch.device | str = "cpu", **overrides: Any):
    """A freshly initialised ``GPT2LMHeadModel`` (weights fixed by ``seed``, global RNG untouched)."""
    from transformers import GPT2LMHeadModel

    config = gpt2_config(size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(device)


def random_token_batches(
    n: int, batch_size: int, seq_len: int, vocab_size: int, *, device: torch.device | str, seed: int = 0
) -> list[torch.Tensor]:
    """``n`` batches of uniformly random token ids ``[batch_size, seq_len]`` (for timing only)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device) for _ in range(n)]


class SamAdamW(torch.optim.AdamW):
    """SAM around AdamW: ascend to ``theta + rho g / ||g||``, take the gradient there, restore, AdamW step.

    ``||g||`` is one L2 norm over all parameter groups (as SASSHA's); ``rho``
    may be set per group. ``theta`` is saved and restored exactly. Same
    closure contract as :class:`sassha_dist.Sassha`: ``step(closure)`` with a
    closure that returns the loss (with its graph) and does not call
    ``backward``; the step zeroes the gradients itself and returns the loss at
    ``theta``. Two forward-backward passes per step.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        rho: float = 0.05,
        *,
        perturb_eps: float = 1e-12,
        foreach: bool | None = None,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"Invalid {rho=}. Must be >= 0.")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
        for group in self.param_groups:
            group.setdefault("rho", rho)
        self.perturb_eps = perturb_eps

    def step(  # type: ignore[override]
        self, closure: Callable[[], torch.Tensor] | None = None, *, max_grad_norm: float | None = None
    ) -> torch.Tensor:
        """One SAM step; ``max_grad_norm`` clips the perturbed gradient before the AdamW update."""
        if closure is None:
            raise ValueError("SamAdamW needs a closure that returns the loss (without calling backward).")
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        with torch.no_grad():
            groups = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
            params = [p for members in groups for p in members]
            if not params:
                return loss.detach()
            grads = [p.grad for p in params]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            theta = [p.detach().clone() for p in params]
            for group, members in zip(self.param_groups, groups):
                if members:
                    scale = group["rho"] / (norm + self.perturb_eps)
                    torch._foreach_add_(members, torch._foreach_mul([p.grad for p in members], scale))
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            closure().backward()
        with torch.no_grad():
            torch._foreach_copy_(params, theta)
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, max_grad_norm)
        super().step()
        return loss.detach()


def build_optimizer(name: str, params: Iterable[torch.Tensor], **hparams: Any) -> torch.optim.Optimizer:
    """``adamw`` (torch's), ``sam-adamw`` (:class:`SamAdamW`), ``sassha`` (:class:`Sassha`) or
    ``msassha`` (:class:`Sassha` with ``perturbation="momentum"``, one pass per step)."""
    if name == "adamw":
        return torch.optim.AdamW(params, **hparams)
    if name == "sam-adamw":
        return SamAdamW(params, **hparams)
    if name == "sassha":
        return Sassha(params, **hparams)
    if name == "msassha":
        return Sassha(params, perturbation=PERTURB_MOMENTUM, **hparams)
    raise ValueError(f"Invalid optimizer {name!r}. Must be one of {OPTIMIZERS}.")


def train_step(
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], torch.Tensor],
    *,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """One training step under the closure contract (the closure never calls ``backward``).

    ``max_grad_norm`` clips the gradient the update uses (SAM-AdamW and SASSHA:
    the perturbed gradient, through SASSHA's pass-by-pass API). Returns the
    detached loss at the pre-step parameters.
    """
    if isinstance(optimizer, Sassha):
        if max_grad_norm is None:
            return optimizer.step(closure)
        loss = optimizer.run_passes(closure)
        try:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            nn.utils.clip_grad_norm_(params, max_grad_norm)
        except BaseException:
            optimizer.cancel()
            raise
        optimizer.update()
        return loss.detach()
    if isinstance(optimizer, SamAdamW):
        return optimizer.step(closure, max_grad_norm=max_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    loss.backward()
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    return loss.detach()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
