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
like ``Trainer`` unless its optimizer is SASSHA, except for two things it does
whatever the optimizer: preemption (below) and a DDP model evaluated before
training (``SasshaTrainer.evaluate``: the stock path then trained without DDP).

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
by DDP (the optimizer's ``Replicated`` strategy, detected automatically),
and the exact-Hessian pass is all-reduced by the strategy.

Training logs gain these keys (README, "What the logs say"):

* ``sassha/grad_norm``: the norm of the gradient at theta, on the last step before
  the log. It only scales the perturbation (eps = rho g / ||g||). The Trainer's
  own ``grad_norm`` beside it is another gradient: the perturbed one at
  theta + eps, before clipping, the one the update uses.
* ``sassha/sharpness``: on that step, the window's loss at theta + eps minus at theta.
* ``sassha/hessian_mean`` / ``sassha/hessian_max``: of ``D``, the EMA of the
  absolute Hessian diagonal, bias-uncorrected, now.
* ``sassha/hessian_refreshes_since_log``: Hessian refreshes since the previous
  training log (this run's, after a resume); ``logging_steps / lazy_hessian``
  on average.
* ``sassha/hessian_refreshes`` and ``sassha/skipped_steps``: running totals
  (a resumed run continues its checkpoint's).

FSDP2 (accelerate's FSDP plugin, ``fsdp_version: 2``)
-----------------------------------------------------

``--fsdp`` with ``fsdp_config`` version 2 (transformers' default) or an
accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``
(``launch/accelerate/fsdp2.yaml``) works unchanged; what happens underneath:

* The Trainer creates the optimizer over the plain parameters, then
  accelerate's ``prepare`` shards the model (``fully_shard``) and swaps the
  optimizer's parameters for DTensors in place. :class:`TrainerSassha` detects
  its strategy again before the first pass: ``FullyShard``, with
  finite-difference Hessians and global probes (``"auto"``), so the trajectory
  does not depend on the number of ranks. ``hessian_method=exact`` and
  ``local_perturbation=true`` need whole parameters and are refused at start-up.
* The buffered micro-batches run under the Trainer's ``no_sync``
  (``set_requires_gradient_sync(False)``) without any backward; the passes run
  on the window's last micro-batch with gradient sync on, so every backward of
  every pass reduce-scatters.
* The Trainer clips the perturbed gradient with accelerate's DTensor-aware
  ``clip_grad_norm_`` (global norm), as under DDP.
* Checkpoints go through accelerate's ``save_fsdp_optimizer`` /
  ``load_fsdp_optimizer`` (``torch.distributed.checkpoint``; both
  ``SHARDED_STATE_DICT`` and ``FULL_STATE_DICT``). torch's state-dict API
  initialises an empty optimizer by calling ``step()`` without a closure at
  ``lr=0`` with zero gradients; :class:`TrainerSassha` then creates the zero
  state and updates nothing. It keeps only ``state`` and ``param_groups``, so
  the counters ride along in every param group. ``resume_from_checkpoint``
  continues bit-exactly.
* ``evaluate()`` before any training (run_clm.py's untrained evaluation) would
  make the stock loop prepare the model alone, which accelerate refuses under
  FSDP2; :class:`SasshaTrainer` prepares model and optimizer together first.
* With bf16 mixed precision the parameters SASSHA sees are fp32 while the
  passes run in bf16: ``--optim_args fd_step=2.5e-2`` is required (a start-up
  error says so; the fp32 default 1e-3 drowns in bf16 rounding).
* ``sassha/hessian_mean`` and ``sassha/hessian_max`` describe this rank's shard
  of ``D`` (the logs shown are rank 0's); ``sassha/grad_norm`` is global and
  ``sassha/sharpness`` is this rank's, as under DDP.

DeepSpeed ZeRO 1, 2, 3 (``--deepspeed config.json`` or an accelerate DeepSpeed config)
-------------------------------------------------------------------------------------

``--deepspeed`` with a config that has no ``optimizer`` block (ZeRO stage 1-3,
fp32 or bf16), or ``accelerate launch --config_file
launch/accelerate/deepspeed_zero{1,2,3}.yaml`` without ``--deepspeed``, works
with ``--optim sassha``; what happens underneath:

* transformers' ``deepspeed_init`` asks :meth:`SasshaTrainer.create_optimizer`
  for DeepSpeed's client optimizer, which is a
  :class:`~sassha_dist.distributed.deepspeed.ZeroSassha` over the Trainer's
  usual parameter groups (SASSHA on ZeRO's flat partitions: each rank holds
  1/W of ``m`` and ``D``; finite-difference Hessians, global probes).
* The window's last ``training_step`` drives the whole step through the engine
  with :class:`~sassha_dist.distributed.deepspeed.SasshaDeepSpeed` (every pass
  through ``engine.backward`` with ``scale_wrt_gas=False``, as the stock
  ``training_step`` does, then one ``engine.step()`` for the update). The
  Trainer's ``optimizer.step()`` is accelerate's no-op under DeepSpeed.
* The learning-rate schedule advances once per step: without a ``scheduler``
  block the Trainer's scheduler steps (the engine has none); with one,
  ``engine.step()`` steps DeepSpeed's and the Trainer's is accelerate's no-op.
* ``gradient_clipping`` (``"auto"``: ``--max_grad_norm``) is applied by DeepSpeed
  inside ``engine.step()`` to **the perturbed gradient**, as the Trainer's
  clipping does without DeepSpeed; the logged ``grad_norm`` is its norm before
  clipping. The engine's accumulation and clipping must equal
  ``--gradient_accumulation_steps`` and ``--max_grad_norm`` (``"auto"`` in the
  config; an accelerate config drops ``gradient_clipping: 0``, leaving
  DeepSpeed's default 1.0): a mismatch is refused at the first step.
* Checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` carry ``m``,
  ``D`` and the counters; ``resume_from_checkpoint`` continues exactly (same
  world size and stage).
* ``sassha/hessian_mean`` and ``sassha/hessian_max`` are model-wide (one
  collective per log, on every rank, as the Trainer logs).
* Refused at start-up with the fix (``check_config``): an ``optimizer`` block,
  fp16, ZeRO stage 0, optimizer/parameter offload, and the others listed in
  ``docs/deepspeed.md``; SASSHA options ZeRO cannot run (``hessian_method=exact``,
  per-rank probes, ``local_perturbation``); an optimizer passed as
  ``optimizers=(...)`` (the Trainer drops it under DeepSpeed).
* ``evaluate()`` before ``train()`` fails under DeepSpeed in transformers itself,
  whatever the optimizer; evaluation during and after training works.

Not supported yet (a clear error at start-up): FSDP1 and XLA FSDP
through the Trainer, tensor/context/sequence parallelism, fp16 with a GradScaler, and
``torch.nn.DataParallel``. Exact Hessian-vector products need a model whose ops
have a double backward: fused SDPA attention has none, so load models with
``attn_implementation="eager"`` or use ``hessian_method=finite_difference``.

Preemption
----------

``SasshaTrainer.train()`` handles ``--preemption_signals`` (default ``SIGTERM``;
``SIGTERM,SIGUSR1`` for Slurm's ``--signal``; empty for none) whatever the
optimizer: a signal only sets a flag, the step in flight runs to its end (a
SASSHA step's parameters are restored from theta + eps exactly before its
update), and at the end of that step every rank agrees (one all-reduce of a
flag per step), the Trainer writes its own checkpoint ``checkpoint-<step>`` in
``output_dir`` (after any evaluation due at that step, as in an uninterrupted run: an
evaluation draws from the RNG, so skipping it would change the dropout masks of the resumed
steps), and ``train()`` raises
:class:`~sassha_dist.preemption.Preempted`: uncaught, the process exits with
status 75, which torchrun restarts. ``train(resume_from_checkpoint=...)``
continues exactly from it (integrations/run_clm.py resumes from the newest
checkpoint in ``output_dir`` by itself). A signal after the last step lets the
run finish.

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
import os
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import OptimizerNames

from sassha_dist import state_keys as keys
from sassha_dist.distributed.fully_shard import FullyShard
from sassha_dist.distributed.resolve import resolve_strategy
from sassha_dist.optimizer import Sassha, StepReport
from sassha_dist.options import EngineCapabilities, SasshaOptions, resolve_options
from sassha_dist.passes import AUTOGRAD_PASSES, PassRunner
from sassha_dist.preemption import DEFAULT_SIGNALS, Preempted, PreemptionGuard, parse_signals
from sassha_dist.presets import LM_WARMUP_ITERS, RECIPE_IMAGE, authors_options

__all__ = [
    "SASSHA",
    "SasshaTrainer",
    "SasshaTrainingArguments",
    "TrainerSassha",
    "check_sassha_arguments",
    "parse_sassha_optim_args",
    "quiet_deepspeed_cpu_warning",
    "sassha_optimizer_kwargs",
    "uses_deepspeed",
]

logger = logging.getLogger(__name__)

#: The ``--optim`` value that selects SASSHA.
SASSHA = "sassha"

#: The code objects whose frames tell who is building or reading the arguments.
_TRAINER_INIT_CODE = inspect.unwrap(Trainer.__init__).__code__
_PARSE_ARGS_CODE = inspect.unwrap(HfArgumentParser.parse_args_into_dataclasses).__code__

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
    preemption_signals: str = field(
        default=",".join(DEFAULT_SIGNALS),
        metadata={
            "help": "Signals on which SasshaTrainer finishes the step in flight, saves a checkpoint in "
            "output_dir and exits with status 75 (restartable), comma-separated: e.g. 'SIGTERM,SIGUSR1' "
            "for Slurm's --signal; '' for none."
        },
    )

    def __post_init__(self) -> None:
        try:
            parse_signals(self.preemption_signals)
        except ValueError as error:
            parser = _command_line_parser()
            if parser is not None:
                _command_line_error(parser.prog, f"--preemption_signals: {error}")
            raise
        is_sassha = isinstance(self.optim, str) and self.optim == SASSHA
        if is_sassha:
            # The stock checks only ever convert optim to OptimizerNames; give them a valid
            # placeholder, then put "sassha" back.
            self.optim = OptimizerNames.ADAMW_TORCH.value
        super().__post_init__()
        if is_sassha:
            self.optim = SASSHA
            try:
                check_sassha_arguments(self)  # fail at start-up on a bad optim_args or value
            except ValueError as error:
                parser = _command_line_parser()
                if parser is not None:
                    _command_line_error(parser.prog, str(error))
                raise

    def set_optimizer(self, name: str | OptimizerNames = "adamw_torch", *args: Any, **kwargs: Any):
        """The stock ``set_optimizer``, also accepting ``name="sassha"``."""
        if name != SASSHA:
            return super().set_optimizer(name, *args, **kwargs)
        super().set_optimizer(OptimizerNames.ADAMW_TORCH, *args, **kwargs)
        self.optim = SASSHA
        check_sassha_arguments(self)
        return self

    def get_process_log_level(self) -> int:
        """The stock ``get_process_log_level``; an error when a stock ``Trainer`` calls it (optim="sassha").

        ``Trainer.__init__`` calls it right after creating its Accelerator, before it touches the
        model, so a stock ``Trainer`` (which would fail only when ``train()`` creates the optimizer:
        "Trainer cannot instantiate unsupported optimizer: sassha") is refused at construction.
        """
        if self.optim == SASSHA:
            caller = sys._getframe(1)
            trainer = caller.f_locals.get("self") if caller.f_code is _TRAINER_INIT_CODE else None
            if trainer is not None and not isinstance(trainer, SasshaTrainer):
                raise TypeError(
                    f"optim='sassha' needs SasshaTrainer, not {type(trainer).__name__}: the stock Trainer "
                    "cannot run SASSHA's passes (it would fail at train() with 'Trainer cannot instantiate "
                    "unsupported optimizer: sassha'). Use SasshaTrainer(...) in place of Trainer(...), with "
                    "the same arguments: from sassha_dist.integrations.transformers import SasshaTrainer."
                )
        return super().get_process_log_level()


def check_sassha_arguments(args: TrainingArguments) -> dict[str, Any]:
    """Validate ``optim="sassha"``'s settings at start-up, before any model or data exists.

    Parses ``optim_args`` (unknown keys, values of the wrong type) and checks every value
    (``rho=-1``, ``betas=0.9:1.5``, ``lazy_hessian=0``, a negative ``--learning_rate`` or
    ``--weight_decay``) by building a throwaway :class:`~sassha_dist.Sassha` over one
    single-device scalar (optimizer state is created lazily, so nothing else is allocated).
    What depends on the engine (exact Hessians under FSDP2 or DeepSpeed, ...) is checked when
    ``SasshaTrainer`` starts. Returns the keywords. Raises ``ValueError`` naming the fix.
    """
    from sassha_dist.distributed.strategy import SingleProcess

    kwargs = sassha_optimizer_kwargs(args)
    probe = torch.zeros(1, requires_grad=True)
    Sassha([probe], **{"weight_decay": args.weight_decay, **kwargs}, strategy=SingleProcess())
    return kwargs


def _command_line_parser() -> HfArgumentParser | None:
    """The ``HfArgumentParser`` whose ``parse_args_into_dataclasses`` is building these arguments, if any."""
    frame = sys._getframe(1)
    for _ in range(12):
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_code is _PARSE_ARGS_CODE:
            return frame.f_locals.get("self")
    return None


def _command_line_error(prog: str, message: str) -> NoReturn:
    """What argparse does with a bad option: ``prog: error: message`` on stderr, exit status 2.

    Without the usage text (TrainingArguments has hundreds of options), and on the first rank
    only, so a launch of several processes prints the line once.
    """
    if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


#: ``optim_args`` keys that choose one of the authors' recipes (``Sassha.authors``) and its warm-ups.
_RECIPE_DEFAULTS: dict[str, Any] = {
    "recipe": RECIPE_IMAGE,
    "rho_warmup_iters": LM_WARMUP_ITERS,
    "hessian_warmup_iters": LM_WARMUP_ITERS,
}


def _sassha_defaults() -> dict[str, Any]:
    signature = inspect.signature(Sassha.__init__)
    defaults = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **_RECIPE_DEFAULTS}


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
    """``Sassha`` keyword arguments from training arguments.

    Without a recipe: lr, betas from adam_beta1/2, then optim_args. With ``recipe=lm`` (or
    ``image``) in optim_args: the authors' recipe (:func:`sassha_dist.presets.authors_options`),
    then optim_args on top; lr (and the groups' weight decay) still come from
    ``--learning_rate`` / ``--weight_decay``.
    """
    parsed = parse_sassha_optim_args(args.optim_args)
    recipe = parsed.pop("recipe", None)
    if recipe is None:
        warmups = sorted(set(parsed) & {"rho_warmup_iters", "hessian_warmup_iters"})
        if warmups:
            raise ValueError(f"optim_args {warmups} need recipe=lm (the authors' GPT-2 recipe).")
        return {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), **parsed}
    return {**authors_options(recipe, **parsed), "lr": args.learning_rate}


# -- the optimizer as the Trainer drives it ------------------------------------------------


class TrainerSassha(Sassha):
    """``Sassha`` whose closure-less ``step()`` finishes a step that :class:`SasshaTrainer` started.

    ``SasshaTrainer.training_step`` runs the passes on the window's last
    micro-batch; the Trainer then clips the (perturbed) gradients and calls
    ``optimizer.step()`` with no closure, which here means ``update()``.
    ``step(closure)`` is the ordinary one-call step.

    Two more things make it fit the engines the Trainer drives:

    * **Parameters swapped after construction.** Under FSDP2 the Trainer
      creates the optimizer over the plain parameters, then accelerate's
      ``prepare`` shards the model and swaps the optimizer's parameters for
      DTensors in place. A strategy detected at construction (no ``strategy=``
      given) is therefore detected again, with the same options, before the
      first pass that sees DTensor parameters (``FullyShard``: finite-difference
      Hessians and global probes under ``"auto"``). State is created lazily, so
      nothing was built for the old parameters.
    * **torch.distributed.checkpoint.state_dict** (accelerate's FSDP checkpoints): ``Sassha``
      itself follows its state-initialisation protocol and keeps the counters in every param
      group; here the strategy is detected again first, as above.
    """

    def __init__(self, params: Any, *args: Any, strategy: Any = None, **kwargs: Any) -> None:
        super().__init__(params, *args, strategy=strategy, **kwargs)
        self._strategy_detected = strategy is None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_strategy_detected", True)

    def _follow_engine(self) -> None:
        """Detect the strategy again if an engine swapped the parameters for DTensors after construction."""
        from sassha_dist.distributed.fully_shard import FullyShard

        if not getattr(self, "_strategy_detected", False) or isinstance(self.strategy, FullyShard):
            return  # chosen by the user, or already following FSDP2: nothing to check on this step
        params = self._all_params()
        if not params or not all(isinstance(p, DTensor) for p in params):
            return
        if self.state:
            raise RuntimeError(
                "TrainerSassha: the parameters became DTensors (FSDP2) after optimizer state was created "
                "for the unsharded ones. Create the optimizer before accelerate's prepare and do not step "
                "it before."
            )
        # Resolve the strategy and the "auto" choices (and reject what the new engine cannot do)
        # exactly as construction does.
        self.use_strategy(resolve_strategy(params))

    def gradient_pass(self, closure: Any, runner: PassRunner = AUTOGRAD_PASSES) -> torch.Tensor | None:
        self._follow_engine()
        return super().gradient_pass(closure, runner)

    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            return super().step(closure)
        if self.in_step:
            return self.update().loss
        if not self.is_state_initialisation():
            raise RuntimeError(
                "TrainerSassha.step() without a closure finishes a step started by SasshaTrainer."
                "training_step, and none is in progress. Outside the Trainer call step(closure)."
            )
        self._follow_engine()
        return super().step(None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._follow_engine()
        super().load_state_dict(state_dict)


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer under accelerate's (and others') ``.optimizer`` wrappers."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


_DEEPSPEED_OPTIMIZER_MESSAGE = (
    "optim='sassha' under DeepSpeed: the Trainer drops an optimizer passed as optimizers=(...) when it "
    "initialises DeepSpeed, and SASSHA must be DeepSpeed's client optimizer (a ZeroSassha built over the "
    "model's parameters). Use optim='sassha' with optim_args (or optimizer_cls_and_kwargs=(Sassha, kwargs)) "
    "instead; SasshaTrainer then builds the ZeroSassha itself."
)


def _check_deepspeed_config(config: Any) -> None:
    """Refuse, with the fix, a DeepSpeed config (``--deepspeed`` or accelerate's) that SASSHA cannot run."""
    from sassha_dist.distributed.deepspeed import check_config

    try:
        check_config(config)
    except ValueError as error:
        raise ValueError(
            f"optim='sassha' under DeepSpeed (--deepspeed or the accelerate config): {error}\n"
            "(SasshaTrainer builds the ZeroSassha from --optim sassha / --optim_args itself.)"
        ) from None


_FSDP_MESSAGE = (
    "optim='sassha' through the Trainer supports FSDP2 only (accelerate's FSDP plugin with fsdp_version 2); "
    "FSDP1 (and XLA FSDP) is not implemented: its flat parameters need "
    "sassha_dist.distributed.FlatShard(fsdp_model), which the Trainer cannot pass. Use FSDP2: --fsdp with "
    "fsdp_config version 2 (transformers' default; drop 'version': 1 from --fsdp_config), or fsdp_version: 2 "
    "in the accelerate config (launch/accelerate/fsdp2.yaml)."
)
_FSDP2_TRAINER_HINT = (
    "Through the Trainer, FSDP2 computes Hessians by finite differences (the Trainer builds the optimizer "
    "without the module that exact products need): remove hessian_method=exact and "
    "local_perturbation=true from optim_args (hessian_method=auto picks finite_difference under FSDP2), "
    "or train with DDP."
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
        # The config after the Trainer filled its "auto" values (fp16/bf16, clipping, batch sizes).
        hf_config = getattr(args, "hf_deepspeed_config", None)
        _check_deepspeed_config(hf_config.config if hf_config is not None else args.deepspeed)
    if getattr(args, "fsdp", None):
        plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
        if plugin_args.get("fsdp_version") != 2:  # FSDP1, or XLA FSDP (no plugin arguments)
            raise NotImplementedError(_FSDP_MESSAGE)
    if getattr(args, "fp16", False):
        raise ValueError(_FP16_MESSAGE)


# -- the trainer -------------------------------------------------------------------------


class SasshaTrainer(Trainer):
    """``Trainer`` that runs SASSHA's two-pass step correctly, with gradient accumulation, DDP, FSDP2 and
    DeepSpeed ZeRO.

    Used with ``optim="sassha"`` (``SasshaTrainingArguments``) it creates a
    :class:`TrainerSassha` over the Trainer's usual parameter groups (decay /
    no decay for biases and norms). ``optimizer_cls_and_kwargs=(Sassha, {...})``
    and ``optimizers=(TrainerSassha(...), scheduler)`` also work. With any
    other optimizer it is the stock ``Trainer``, plus preemption handling and a fix for evaluating
    a DDP model before training (both in the module docstring). See the module docstring for
    how a step maps onto the Trainer's loop, and for the logged diagnostics
    (``sassha/*``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and _selects_sassha(training_args, kwargs):
            # Before the Accelerator exists: refuse what the arguments alone already rule out.
            _check_arguments(training_args)
        if training_args is not None and not uses_deepspeed(training_args):
            quiet_deepspeed_cpu_warning()
        super().__init__(*args, **kwargs)
        self._sassha_window: list[tuple[dict[str, Any], Any]] = []
        #: The Hessian-refresh count at the last training log (set when training starts).
        self._sassha_refreshes_logged: int | None = None
        self.add_callback(_SasshaLogMark(self))
        self.add_callback(_StopOnPreemption(self))
        #: The guard while train() runs, and the step a preemption stopped it after.
        self._preemption: PreemptionGuard | None = None
        self._preempted_after: int | None = None
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

    def _requested_sassha_options(self, model: nn.Module | None = None) -> dict[str, Any]:
        """SASSHA's keywords as requested: the options of an optimizer already built, else those of
        ``optimizer_cls_and_kwargs``, else those of ``--optim sassha`` (lr, betas and optim_args)."""
        optimizer = self._sassha()
        if optimizer is not None:
            return {f.name: getattr(optimizer.options, f.name) for f in fields(optimizer.options)}
        _, kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
            self.args, model if model is not None else self.model
        )
        return dict(kwargs)

    def _check_engine(self) -> None:
        """Refuse, at start-up, engines (also those chosen by an accelerate config) that break the step."""
        if self.is_deepspeed_enabled:
            # Also reached when the DeepSpeed plugin comes from an accelerate config, not from --deepspeed.
            if self.optimizer is not None:
                raise ValueError(_DEEPSPEED_OPTIMIZER_MESSAGE)
            _check_deepspeed_config(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            from sassha_dist.distributed.deepspeed import DeepSpeedZero

            self._check_requested_options(DeepSpeedZero.default_capabilities())
        if getattr(self, "is_fsdp_xla_enabled", False):
            raise NotImplementedError(_FSDP_MESSAGE)
        if self.is_fsdp_enabled:
            # Also reached when the FSDP plugin comes from an accelerate config, not from --fsdp.
            if getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
                raise NotImplementedError(_FSDP_MESSAGE)
            try:
                self._check_requested_options(FullyShard.default_capabilities())
            except ValueError as error:
                raise ValueError(f"{error} {_FSDP2_TRAINER_HINT}") from None
            options = self._requested_sassha_options()
            if self.accelerator.mixed_precision == "bf16" and options.get("fd_step") is None:
                # Measured on the tiny GPT-2, 4 steps: loss 5.55 -> 8.4 with the default step,
                # 5.55 -> 5.7 with 2.5e-2.
                raise ValueError(
                    "optim='sassha' under FSDP2 with bf16 mixed precision needs an explicit "
                    "finite-difference step: the parameters SASSHA sees are fp32, so the default (fp32's "
                    "1e-3) would drown in the bf16 forward and backward. Pass --optim_args fd_step=2.5e-2."
                )
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
        if self.optimizer is None and self.is_deepspeed_enabled and self._uses_sassha():
            # transformers' deepspeed_init calls this for DeepSpeed's client optimizer, which must be
            # a ZeroSassha (SASSHA on ZeRO's flat partitions) built from the same keywords.
            from sassha_dist.distributed.deepspeed import ZeroSassha

            self.optimizer_cls_and_kwargs = (ZeroSassha, self._requested_sassha_options(model))
        return super().create_optimizer(model)

    def _sassha(self) -> Sassha | None:
        """The SASSHA optimizer under accelerate's wrapper, or ``None`` for any other optimizer."""
        optimizer = _unwrap_optimizer(self.optimizer)
        if getattr(self, "is_deepspeed_enabled", False) and not isinstance(optimizer, Sassha):
            # accelerate's wrapper holds DeepSpeed's ZeRO optimizer (not a torch Optimizer), which holds ours.
            optimizer = _unwrap_optimizer(getattr(optimizer, "optimizer", None))
        return optimizer if isinstance(optimizer, Sassha) else None

    def _check_requested_options(self, capabilities: EngineCapabilities) -> None:
        """Refuse at start-up the SASSHA options the engine cannot run (exact Hessians, per-rank probes, ...).

        The same check the optimizer makes when it is built inside ``train()``:
        :func:`~sassha_dist.options.resolve_options` against the engine's capabilities.
        """
        requested = self._requested_sassha_options()
        names = {option.name for option in fields(SasshaOptions)}
        options = SasshaOptions(**{key: value for key, value in requested.items() if key in names})
        resolve_options(options, capabilities)

    def _sassha_deepspeed(self) -> Any:
        """The :class:`~sassha_dist.distributed.deepspeed.SasshaDeepSpeed` driving the current engine."""
        from sassha_dist.distributed.deepspeed import SasshaDeepSpeed

        engine = self.model_wrapped
        driver = getattr(self, "_sassha_deepspeed_driver", None)
        if driver is None or driver.engine is not engine:
            engine_steps = engine.gradient_accumulation_steps()
            if engine_steps != self.args.gradient_accumulation_steps:
                raise ValueError(
                    f"optim='sassha' under DeepSpeed: the engine accumulates {engine_steps} micro-batches "
                    f"per step, the Trainer {self.args.gradient_accumulation_steps}. Set "
                    '"gradient_accumulation_steps": "auto" in the DeepSpeed config (or the same value as '
                    "--gradient_accumulation_steps) instead."
                )
            clipping = float(engine.gradient_clipping() or 0.0)
            if clipping != float(self.args.max_grad_norm or 0.0):
                # DeepSpeed clips the perturbed gradient inside engine.step(); the Trainer's own clipping
                # is a no-op under DeepSpeed, so a differing value would be silently ignored.
                raise ValueError(
                    f"optim='sassha' under DeepSpeed: the engine clips gradients at {clipping} (DeepSpeed's "
                    f"default is 1.0), --max_grad_norm is {self.args.max_grad_norm}. Set "
                    '"gradient_clipping": "auto" in the DeepSpeed config (or the same value as '
                    "--max_grad_norm; accelerate's config drops gradient_clipping: 0) instead."
                )
            # The Trainer's closures return losses already scaled for accumulation (as the stock
            # training_step does, which also passes scale_wrt_gas=False under DeepSpeed).
            driver = self._sassha_deepspeed_driver = SasshaDeepSpeed(engine, scale_wrt_gas=False)
        return driver

    def train(self, *args: Any, **kwargs: Any):
        """The stock ``train``, with preemption handled (module docstring, "Preemption"): raises
        :class:`~sassha_dist.preemption.Preempted` after saving when a handled signal arrived."""
        self._sassha_window = []
        optimizer = self._sassha()
        if optimizer is not None:
            optimizer.cancel()
        signals = parse_signals(getattr(self.args, "preemption_signals", ",".join(DEFAULT_SIGNALS)))
        if signals and threading.current_thread() is not threading.main_thread():
            logger.warning(
                "SasshaTrainer.train() runs outside the main thread, where Python cannot handle signals: "
                "%s will stop this run without a checkpoint.",
                ",".join(s.name for s in signals),
            )
            signals = ()
        self._preemption = PreemptionGuard(signals)
        self._preempted_after = None
        try:
            with self._preemption:
                result = super().train(*args, **kwargs)
        finally:
            guard, self._preemption = self._preemption, None
        if self._preempted_after is not None:
            logger.warning(
                "Preempted (%s): stopped after step %d and saved %s; resume with resume_from_checkpoint.",
                guard.received.name if guard.received else "a signal on another rank",
                self._preempted_after,
                os.path.join(self.args.output_dir, f"checkpoint-{self._preempted_after}"),
            )
            raise Preempted(guard.received)
        return result

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The stock ``evaluate``; under FSDP2 before any training, the model is sharded first.

        The stock evaluation loop would ``prepare`` the model alone, which accelerate refuses
        under FSDP2 (model and optimizer must be prepared together). So the optimizer is
        created and both are prepared exactly as ``train()`` would; ``train()`` then finds
        them prepared (evaluating the untrained model, as run_clm.py does, works).
        """
        if not (self._uses_sassha() and self._fsdp2_unprepared()):
            unprepared = not getattr(self.model, "_is_accelerate_prepared", False)
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                if unprepared:
                    self._undo_evaluation_only_preparation()
        from torch.distributed.fsdp import FSDPModule

        self.create_optimizer()
        model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model = self.model_wrapped = model
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            # Units that keep their weights unsharded after forward (the root, the output layer) would
            # still hold them: reshard, so train()'s prepare finds the sharded parameters again.
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def _undo_evaluation_only_preparation(self) -> None:
        """Let ``train()`` wrap the model in DDP although ``evaluate()`` prepared it first.

        The stock evaluation loop prepares a not-yet-trained model with accelerate's
        ``prepare_model(model, evaluation_mode=True)``, which places it but does not wrap it in
        DDP, and marks it prepared (``_is_accelerate_prepared``, accelerate 1.16). ``train()``'s
        ``prepare`` then returns the marked model as it is: training runs without DDP, every rank
        on its own gradients, and the ranks drift apart (measured: weights 0.25 apart after 4 AdamW
        steps on 2 gloo ranks, 0.10 with SASSHA). So after an evaluation that prepared the model
        for evaluation only, in a multi-process run that accelerate wraps in DDP, the mark (and the
        mixed-precision ``forward`` it installed) is removed, and ``train()`` prepares the model
        from scratch, as if no evaluation had come first.
        """
        model, accelerator = self.model, self.accelerator
        if not getattr(model, "_is_accelerate_prepared", False) or self.model_wrapped is not model:
            return  # not prepared by this evaluation, or already wrapped for training
        if accelerator.num_processes < 2 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return  # nothing to wrap in DDP
        del model._is_accelerate_prepared
        if "_original_forward" in model.__dict__:  # the autocast forward of mixed precision
            model.forward = model.__dict__.pop("_original_forward")
        models = getattr(accelerator, "_models", None)
        if isinstance(models, list) and model in models:
            models.remove(model)

    def _fsdp2_unprepared(self) -> bool:
        accelerator = self.accelerator
        return bool(
            self.is_fsdp_enabled and getattr(accelerator, "is_fsdp2", False) and not accelerator._models
        )

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
        if self.is_deepspeed_enabled:
            # The whole step, update included, runs through the engine (its optimizer.step() and the
            # Trainer's optimizer.step() are no-ops under DeepSpeed).
            return self._sassha_deepspeed().step(closures).detach().to(self.args.device)
        if self.is_fsdp_enabled and hasattr(model, "set_requires_gradient_sync"):
            # FSDP2: every pass runs the whole window now, so each backward must reduce-scatter
            # (the Trainer's no_sync, which sets this to False, only covers the buffered micro-batches).
            model.set_requires_gradient_sync(True)
        return self._sassha_passes(optimizer, closures)

    def _sassha_passes(self, optimizer: Sassha, closures: Sequence[Any]) -> torch.Tensor:
        """SASSHA's passes over the window; leaves theta + eps and the perturbed gradient for the Trainer.

        The Trainer then clips ``p.grad`` (the perturbed gradient) and calls
        ``optimizer.step()``, which restores theta exactly and updates.
        """
        try:
            loss = optimizer.run_passes(closures)  # cancels the step itself on any error
        except RuntimeError as error:
            if "derivative for" in str(error) and "not implemented" in str(error):
                raise RuntimeError(
                    f"{error}\nSASSHA's exact Hessian-vector products need a double backward through the "
                    "model, and one of its ops has none (typically fused SDPA / flash attention). Load the "
                    "model with attn_implementation='eager' (or model.set_attn_implementation('eager'); "
                    'for a script without that option, set "attn_implementation": "eager" in the model\'s '
                    "config.json), or pass --optim_args hessian_method=finite_difference (first-order "
                    "passes only)."
                ) from error
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
        # Under DeepSpeed each rank holds a partition of D: the model-wide figures need a collective
        # (the Trainer logs on every rank, the main process prints).
        if self.is_deepspeed_enabled:
            stats = self._sassha_deepspeed().hessian_stats()
        else:
            stats = optimizer.hessian_stats()
        logs["sassha/hessian_mean"] = stats["hessian_mean"]
        logs["sassha/hessian_max"] = stats["hessian_max"]
        refreshes = optimizer.counters[keys.HESSIAN_REFRESHES]
        logs["sassha/hessian_refreshes_since_log"] = float(refreshes - (self._sassha_refreshes_logged or 0))
        logs["sassha/hessian_refreshes"] = float(refreshes)
        logs["sassha/skipped_steps"] = float(optimizer.skipped_steps)
        return logs

    def _mark_sassha_log(self) -> None:
        """Remember the Hessian-refresh count, from which the next log counts its refreshes."""
        optimizer = self._sassha()
        refreshes = None if optimizer is None else optimizer.counters[keys.HESSIAN_REFRESHES]
        self._sassha_refreshes_logged = refreshes

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log, not an evaluation or the final summary
            logs.update(self.sassha_diagnostics())
            self._mark_sassha_log()
        super().log(logs, start_time)


class _SasshaLogMark(TrainerCallback):
    """Marks the Hessian-refresh count when training starts, after a checkpoint was loaded.

    So ``sassha/hessian_refreshes_since_log`` counts this run's refreshes also on the first log
    after ``resume_from_checkpoint``.
    """

    def __init__(self, trainer: SasshaTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer()
        if trainer is not None:
            trainer._mark_sassha_log()


class _StopOnPreemption(TrainerCallback):
    """At the end of every step, on every rank: if any rank received a handled signal, save this step
    (the Trainer's own checkpoint, after any evaluation due, so the saved RNG state is the one an
    uninterrupted run continues from), and stop training."""

    def __init__(self, trainer: SasshaTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer()
        if trainer is None or trainer._preemption is None or not trainer._preemption.signals:
            return
        if trainer._preemption.should_stop():
            control.should_save = True
            control.should_training_stop = True
            trainer._preempted_after = state.global_step


def uses_deepspeed(args: TrainingArguments) -> bool:
    """Whether a run with these arguments trains through DeepSpeed (``--deepspeed`` or accelerate's)."""
    from_accelerate = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    return bool(getattr(args, "deepspeed", None)) or from_accelerate


class _DropDeepSpeedCpuProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU.")


def quiet_deepspeed_cpu_warning() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU. ... we were unable to detect it." on runs without it.

    accelerate imports DeepSpeed whenever it is installed, to recognise a DeepSpeed engine when it
    unwraps a model (``extract_model_from_parallel``, called by ``Trainer.__init__`` and
    ``save_pretrained``); on a machine without a GPU DeepSpeed's import then logs that warning,
    although nothing uses DeepSpeed. This filter on DeepSpeed's logger drops that one message;
    every other DeepSpeed message stays. (With ``DS_ACCELERATOR=cpu`` DeepSpeed does not probe.)
    """
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropDeepSpeedCpuProbe) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropDeepSpeedCpuProbe())
