"""SASSHA in the Hugging Face ``Trainer``: ``--optim sassha`` and a two-pass ``training_step``.

Opt in with two classes::

    from sassha_dist.integrations.transformers import SasshaTrainer, SasshaTrainingArguments

    parser = HfArgumentParser(SasshaTrainingArguments)      # --optim sassha --optim_args "rho=0.05"
    args = SasshaTrainingArguments(output_dir="out", optim="sassha", optim_args="rho=0.05,lazy_hessian=10")
    trainer = SasshaTrainer(model=model, args=args, train_dataset=...)

``SasshaTrainingArguments`` is ``TrainingArguments`` whose ``optim`` also
accepts ``"sassha"``; every other value goes through the stock validation
unchanged (so ``adamw_torch`` works and an unknown name gets the stock
``... is not a valid OptimizerNames`` error). ``SasshaTrainer`` behaves exactly
like ``Trainer`` unless its optimizer is SASSHA.

How a SASSHA step runs inside the Trainer's loop
-------------------------------------------------

The Trainer calls ``training_step`` once per micro-batch (under DDP's
``no_sync`` for all but the last of an accumulation window), then at the
window's boundary clips the gradients (``max_grad_norm``), calls
``optimizer.step()`` and steps the learning-rate scheduler. SASSHA needs every
micro-batch of the window in each of its passes, so:

1. ``training_step`` only buffers the prepared inputs of micro-batches
   ``1 .. n-1`` and returns a zero loss (no forward, no backward).
2. On the window's last micro-batch (the Trainer has set
   ``accelerator.sync_gradients``), it builds one closure per micro-batch and
   runs the passes: ``gradient_pass`` (gradient at theta), ``perturb``,
   ``perturbed_pass`` (gradient at theta + eps, fused with the exact HVPs on
   Hessian steps) and ``hessian_pass`` (finite-difference HVPs, if that is the
   method). It returns the window's loss at theta (the sum of the micro-batch
   losses), so the Trainer logs the same loss as with any other optimizer.
   Each closure computes the loss exactly as the stock ``training_step`` does
   (``compute_loss`` with ``num_items_in_batch``, divided by the number of
   micro-batches unless the loss is already normalised over the window).
3. The parameters are now at theta + eps and ``p.grad`` holds the perturbed
   gradient. The Trainer's own clipping therefore clips **the perturbed
   gradient**, the one that feeds the momentum; the logged ``grad_norm`` is its
   norm before clipping. (Clipping the gradient at theta would change nothing:
   the perturbation only uses its direction.)
4. The Trainer's ``optimizer.step()`` reaches :class:`TrainerSassha`, whose
   closure-less ``step()`` finishes the started step with ``update()``: exact
   restore of theta, then the update with the clipped perturbed gradient and
   the current learning rate. Then the scheduler steps as usual.

Checkpoints go through ``Sassha.state_dict()``, which carries ``m``, ``D`` and
the optimizer-wide counters (step, Hessian refreshes, skipped steps); the
probes are counter-based, so ``resume_from_checkpoint`` continues exactly.

A step SASSHA skips for a non-finite loss, gradient or Hessian estimate
(``on_nonfinite="skip"``) leaves parameters and optimizer state untouched; the
Trainer still counts the step and steps the scheduler, as it does for any
optimizer. Under DDP every micro-batch's backward inside the passes is reduced
by DDP (the optimizer's ``DataParallel`` strategy, detected automatically),
and the exact-Hessian pass is all-reduced by the strategy.

Training logs gain, for the last step before each log: ``sassha/grad_norm``
(norm of the gradient at theta, which scales the perturbation),
``sassha/sharpness`` (the window's loss at theta + eps minus at theta),
``sassha/hessian_mean`` / ``sassha/hessian_max`` (of ``D``, bias-uncorrected),
``sassha/hessian_refreshed`` (1 if that step refreshed ``D``),
``sassha/hessian_refreshes`` and ``sassha/skipped_steps`` (running totals).
The Trainer's own ``grad_norm`` is the perturbed gradient's, before clipping.

Not supported yet (a clear error at start-up): DeepSpeed, FSDP,
tensor/context/sequence parallelism, fp16 with a GradScaler, and
``torch.nn.DataParallel``. Exact Hessian-vector products need a model whose ops
have a double backward: fused SDPA attention has none, so load models with
``attn_implementation="eager"`` or use ``hessian_method=finite_difference``.

``optim_args`` for SASSHA (comma-separated ``key=value``): any keyword of
:class:`~sassha_dist.Sassha` except ``lr`` and ``weight_decay`` (use
``--learning_rate`` and ``--weight_decay``, which the Trainer applies with its
usual no-decay group for biases and norms). Values are converted to the
keyword's type: floats (``rho=0.05``, ``eps=1e-4``), ints
(``lazy_hessian=10``), booleans (``adaptive=true``; also ``1/0/yes/no``),
strings (``hessian_method=finite_difference``), ``none`` for optional ones
(``fd_step=none``), and pairs with a colon: ``betas=0.965:0.99``. Without
``betas`` the pair is ``(adam_beta1, adam_beta2)``. ``adam_epsilon`` is not
used: SASSHA's ``eps`` (default 1e-4) is a different quantity, set it with
``eps=...``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from sassha_dist import state_keys as keys
from sassha_dist.optimizer import Sassha, StepReport

__all__ = [
    "SASSHA",
    "SasshaTrainer",
    "SasshaTrainingArguments",
    "TrainerSassha",
    "parse_sassha_optim_args",
    "sassha_optimizer_kwargs",
]

logger = logging.getLogger(__name__)

#: The ``--optim`` value that selects SASSHA.
SASSHA = "sassha"

#: Keywords of ``Sassha`` that ``optim_args`` may not set, and where they come from instead.
_RESERVED = {
    "params": "the Trainer's parameter groups",
    "lr": "--learning_rate",
    "weight_decay": "--weight_decay",
    "strategy": "auto-detection from the engine",
}


# -- arguments ---------------------------------------------------------------------------


@dataclass
class SasshaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose ``optim`` also accepts ``"sassha"`` (used with :class:`SasshaTrainer`).

    Every other ``optim`` value is validated by the stock code, unchanged.
    """

    optim: str = field(
        default=TrainingArguments.default_optim,
        metadata={
            "help": "The optimizer to use: 'sassha' (with SasshaTrainer), or any of transformers' "
            "OptimizerNames (adamw_torch, adamw_torch_fused, sgd, adafactor, ...)."
        },
    )
    optim_args: str | None = field(
        default=None,
        metadata={
            "help": "Optional optimizer arguments. For sassha: comma-separated key=value pairs of Sassha's "
            "keywords, e.g. 'rho=0.05,lazy_hessian=10,betas=0.965:0.99,hessian_method=exact' "
            "(lr and weight_decay come from --learning_rate and --weight_decay)."
        },
    )

    def __post_init__(self) -> None:
        is_sassha = isinstance(self.optim, str) and self.optim == SASSHA
        if is_sassha:
            # The stock checks only ever convert optim to OptimizerNames; give them a valid
            # placeholder, then put "sassha" back.
            self.optim = OptimizerNames.ADAMW_TORCH.value
        super().__post_init__()
        if is_sassha:
            self.optim = SASSHA
            parse_sassha_optim_args(self.optim_args)  # fail at start-up on a bad optim_args

    def set_optimizer(self, name: str | OptimizerNames = "adamw_torch", *args: Any, **kwargs: Any):
        """The stock ``set_optimizer``, also accepting ``name="sassha"``."""
        if name != SASSHA:
            return super().set_optimizer(name, *args, **kwargs)
        super().set_optimizer(OptimizerNames.ADAMW_TORCH, *args, **kwargs)
        self.optim = SASSHA
        parse_sassha_optim_args(self.optim_args)
        return self


def _sassha_defaults() -> dict[str, Any]:
    signature = inspect.signature(Sassha.__init__)
    return {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.default is not inspect.Parameter.empty
    }


_TRUE, _FALSE, _NONE = ("true", "1", "yes", "on"), ("false", "0", "no", "off"), ("none", "null")


def _convert(key: str, text: str, default: Any) -> Any:
    lowered = text.lower()
    try:
        if isinstance(default, bool):
            if lowered in _TRUE + _FALSE:
                return lowered in _TRUE
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        if isinstance(default, tuple):
            parts = text.split(":")
            if len(parts) != len(default):
                raise ValueError
            return tuple(float(p) for p in parts)
        # Optional keywords (default None: fd_step, foreach, ...): none, a boolean, or a number.
        if lowered in _NONE:
            return None
        if lowered in _TRUE + _FALSE:
            return lowered in _TRUE
        return float(text)
    except ValueError:
        expected = {bool: "true/false", int: "an int", float: "a float", tuple: "floats joined by ':'"}
        fallback = "none, true/false or a number"
        kind = next((v for t, v in expected.items() if isinstance(default, t)), fallback)
        raise ValueError(f"Invalid optim_args value {key}={text!r} for sassha: expected {kind}.") from None


def parse_sassha_optim_args(optim_args: str | None) -> dict[str, Any]:
    """Parse SASSHA's ``optim_args``: ``"rho=0.05,lazy_hessian=10,betas=0.965:0.99"`` to
    ``{"rho": 0.05, "lazy_hessian": 10, "betas": (0.965, 0.99)}``.

    Keys are Sassha's keywords; values are converted to each keyword's type
    (see the module docstring). Unknown or reserved keys raise ``ValueError``.
    """
    if not optim_args or not optim_args.strip():
        return {}
    defaults = _sassha_defaults()
    parsed: dict[str, Any] = {}
    for item in optim_args.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"Invalid optim_args entry {item!r}: expected key=value (e.g. rho=0.05).")
        if key in _RESERVED:
            raise ValueError(f"optim_args may not set {key!r} for sassha: it comes from {_RESERVED[key]}.")
        if key not in defaults:
            valid = ", ".join(sorted(k for k in defaults if k not in _RESERVED))
            raise ValueError(f"Unknown optim_args key {key!r} for sassha. Valid keys: {valid}.")
        if key in parsed:
            raise ValueError(f"optim_args sets {key!r} twice.")
        parsed[key] = _convert(key, value, defaults[key])
    return parsed


def sassha_optimizer_kwargs(args: TrainingArguments) -> dict[str, Any]:
    """``Sassha`` keyword arguments from training arguments: lr, betas from adam_beta1/2, then optim_args."""
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2)}
    kwargs.update(parse_sassha_optim_args(args.optim_args))
    return kwargs


# -- the optimizer as the Trainer drives it ------------------------------------------------


class TrainerSassha(Sassha):
    """``Sassha`` whose closure-less ``step()`` finishes a step that :class:`SasshaTrainer` started.

    ``SasshaTrainer.training_step`` runs the passes on the window's last
    micro-batch; the Trainer then clips the (perturbed) gradients and calls
    ``optimizer.step()`` with no closure, which here means ``update()``.
    ``step(closure)`` is the ordinary one-call step.
    """

    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            return super().step(closure)
        if not self.in_step:
            raise RuntimeError(
                "TrainerSassha.step() without a closure finishes a step started by SasshaTrainer."
                "training_step, and none is in progress. Outside the Trainer call step(closure)."
            )
        report = self.update()
        return report.loss


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer under accelerate's (and others') ``.optimizer`` wrappers."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


_DEEPSPEED_MESSAGE = (
    "optim='sassha' under DeepSpeed is not implemented yet: DeepSpeed's engine steps its own optimizer "
    "inside backward, which breaks SASSHA's two passes. Remove --deepspeed (and any deepspeed section of "
    "the accelerate config) and train with DDP (accelerate launch --multi_gpu, or "
    "launch/accelerate/cpu_ddp.yaml on CPUs) or on a single device."
)
_FSDP_MESSAGE = (
    "optim='sassha' under FSDP is not implemented yet (sharded parameters need SASSHA's sharded "
    "strategy). Remove --fsdp (and the FSDP section of the accelerate config) and train with DDP or on "
    "a single device."
)
_FP16_MESSAGE = (
    "optim='sassha' does not support fp16 with a GradScaler: one loss scale cannot cover SASSHA's several "
    "passes, and a step the scaler skips would leave a started SASSHA step behind. Use --bf16 or fp32."
)


def _is_sassha_cls(cls_and_kwargs: Any) -> bool:
    return (
        cls_and_kwargs is not None
        and isinstance(cls_and_kwargs[0], type)
        and issubclass(cls_and_kwargs[0], Sassha)
    )


def _selects_sassha(args: Any, kwargs: dict[str, Any]) -> bool:
    optimizers = kwargs.get("optimizers") or (None, None)
    return (
        getattr(args, "optim", None) == SASSHA
        or isinstance(_unwrap_optimizer(optimizers[0]), Sassha)
        or _is_sassha_cls(kwargs.get("optimizer_cls_and_kwargs"))
    )


def _check_arguments(args: TrainingArguments) -> None:
    """Configurations the training arguments alone rule out for SASSHA."""
    if getattr(args, "deepspeed", None):
        raise NotImplementedError(_DEEPSPEED_MESSAGE)
    if getattr(args, "fsdp", None):
        raise NotImplementedError(_FSDP_MESSAGE)
    if getattr(args, "fp16", False):
        raise ValueError(_FP16_MESSAGE)


# -- the trainer -------------------------------------------------------------------------


class SasshaTrainer(Trainer):
    """``Trainer`` that runs SASSHA's two-pass step correctly, with gradient accumulation and DDP.

    Used with ``optim="sassha"`` (``SasshaTrainingArguments``) it creates a
    :class:`TrainerSassha` over the Trainer's usual parameter groups (decay /
    no decay for biases and norms). ``optimizer_cls_and_kwargs=(Sassha, {...})``
    and ``optimizers=(TrainerSassha(...), scheduler)`` also work. With any
    other optimizer it is the stock ``Trainer``. See the module docstring for
    how a step maps onto the Trainer's loop, and for the logged diagnostics
    (``sassha/*``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and _selects_sassha(training_args, kwargs):
            # Before the Accelerator exists: refuse what the arguments alone already rule out.
            _check_arguments(training_args)
        super().__init__(*args, **kwargs)
        self._sassha_window: list[tuple[dict[str, Any], Any]] = []
        if isinstance(self.optimizer, Sassha) and not isinstance(self.optimizer, TrainerSassha):
            raise TypeError(
                "SasshaTrainer needs a TrainerSassha (a Sassha whose closure-less step() finishes the "
                "step the Trainer started): pass optimizers=(TrainerSassha(...), scheduler), or "
                "optimizer_cls_and_kwargs=(Sassha, kwargs), or optim='sassha' with optim_args."
            )
        if self._uses_sassha():
            self._check_engine()

    # -- set-up ----------------------------------------------------------------------------

    def _uses_sassha(self) -> bool:
        return _selects_sassha(self.args, {"optimizers": (self.optimizer, None)}) or _is_sassha_cls(
            self.optimizer_cls_and_kwargs
        )

    def _check_engine(self) -> None:
        """Refuse, at start-up, engines (also those chosen by an accelerate config) that break the step."""
        if self.is_deepspeed_enabled:
            raise NotImplementedError(_DEEPSPEED_MESSAGE)
        if self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False):
            raise NotImplementedError(_FSDP_MESSAGE)
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        sizes = {name: getattr(self, f"get_{name}_size", lambda: 1)() for name in ("tp", "cp", "sp")}
        if parallelism is not None and any(size > 1 for size in sizes.values()):
            raise NotImplementedError(
                f"optim='sassha' with tensor/context/sequence parallelism ({sizes}) is not implemented yet; "
                "use data parallelism (DDP) only."
            )
        if getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError(_FP16_MESSAGE)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"optim='sassha' does not support torch.nn.DataParallel ({self.args.n_gpu} GPUs in one "
                "process). Launch one process per GPU instead: accelerate launch or torchrun (DDP)."
            )

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model: nn.Module | None = None) -> tuple:
        if args.optim == SASSHA:
            return TrainerSassha, sassha_optimizer_kwargs(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        cls_and_kwargs = self.optimizer_cls_and_kwargs
        if self.optimizer is None and cls_and_kwargs is not None and cls_and_kwargs[0] is Sassha:
            self.optimizer_cls_and_kwargs = (TrainerSassha, cls_and_kwargs[1])
        return super().create_optimizer(model)

    def _sassha(self) -> Sassha | None:
        """The SASSHA optimizer under accelerate's wrapper, or ``None`` for any other optimizer."""
        optimizer = _unwrap_optimizer(self.optimizer)
        return optimizer if isinstance(optimizer, Sassha) else None

    def train(self, *args: Any, **kwargs: Any):
        self._sassha_window = []
        optimizer = self._sassha()
        if optimizer is not None:
            optimizer.cancel()
        return super().train(*args, **kwargs)

    # -- the step --------------------------------------------------------------------------

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """The stock ``training_step``'s rule: did ``compute_loss`` already normalise over the window?"""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def _closure(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any, micro_batches: int):
        """One micro-batch's loss at the current parameters, scaled as the stock training_step scales it."""
        divide = not self._loss_is_scaled_for_ga(num_items_in_batch)

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                # compute_loss may pop "labels": hand it a fresh mapping on every pass.
                loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            return loss / micro_batches if divide else loss

        return closure

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        optimizer = self._sassha()
        if optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        self._sassha_window.append((self._prepare_inputs(inputs), num_items_in_batch))
        if not self.accelerator.gradient_state.sync_gradients:
            # Not the window's last micro-batch: keep it for the passes, report nothing yet.
            return torch.zeros((), device=self.args.device)
        micro_batches = getattr(self, "current_gradient_accumulation_steps", len(self._sassha_window))
        window, self._sassha_window = self._sassha_window, []
        if len(window) > micro_batches:
            logger.warning(
                "SasshaTrainer: %d micro-batches buffered for a window of %d; dropping the oldest %d (an "
                "accumulation window was cut short, e.g. by a dataset that ended early).",
                len(window),
                micro_batches,
                len(window) - micro_batches,
            )
            window = window[-micro_batches:]
        closures = [self._closure(model, batch, n, micro_batches) for batch, n in window]
        return self._sassha_passes(optimizer, closures)

    def _sassha_passes(self, optimizer: Sassha, closures: Sequence[Any]) -> torch.Tensor:
        """SASSHA's passes over the window; leaves theta + eps and the perturbed gradient for the Trainer.

        The Trainer then clips ``p.grad`` (the perturbed gradient) and calls
        ``optimizer.step()``, which restores theta exactly and updates.
        """
        try:
            loss = optimizer.gradient_pass(closures)
            optimizer.perturb(loss)
            optimizer.perturbed_pass(closures)
            optimizer.hessian_pass(closures)
        except RuntimeError as error:
            optimizer.cancel()
            if "derivative for" in str(error) and "not implemented" in str(error):
                raise RuntimeError(
                    f"{error}\nSASSHA's exact Hessian-vector products need a double backward through the "
                    "model, and one of its ops has none (typically fused SDPA / flash attention). Load the "
                    "model with attn_implementation='eager' (or model.set_attn_implementation('eager')), "
                    "or pass --optim_args hessian_method=finite_difference (first-order passes only)."
                ) from error
            raise
        except BaseException:
            optimizer.cancel()
            raise
        return loss.detach().to(self.args.device)

    # -- logs ------------------------------------------------------------------------------

    def sassha_diagnostics(self) -> dict[str, float]:
        """SASSHA's state for the logs: last step's gradient norm and sharpness, the Hessian EMA, counters."""
        optimizer = self._sassha()
        if optimizer is None or optimizer.counters[keys.GLOBAL_STEP] + optimizer.skipped_steps == 0:
            return {}
        report: StepReport = optimizer.last_report
        logs: dict[str, float] = {}
        if report.grad_norm is not None:
            logs["sassha/grad_norm"] = float(report.grad_norm)
        if report.loss is not None and report.perturbed_loss is not None:
            # The loss increase the perturbation found (the window's loss at theta + eps minus at theta).
            logs["sassha/sharpness"] = float(report.perturbed_loss - report.loss)
        stats = optimizer.hessian_stats()
        logs["sassha/hessian_mean"] = stats["hessian_mean"]
        logs["sassha/hessian_max"] = stats["hessian_max"]
        refreshes = optimizer.counters[keys.HESSIAN_REFRESHES]
        logs["sassha/hessian_refreshed"] = float(report.hessian_refreshed)
        logs["sassha/hessian_refreshes"] = float(refreshes)
        logs["sassha/skipped_steps"] = float(optimizer.skipped_steps)
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log, not an evaluation or the final summary
            logs.update(self.sassha_diagnostics())
        super().log(logs, start_time)
