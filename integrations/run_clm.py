#!/usr/bin/env python
"""Causal-LM training with the Hugging Face Trainer and ``--optim sassha``, in the style of
transformers' ``examples/pytorch/language-modeling/run_clm.py``.

With no model or data arguments it needs no download: it fine-tunes the embedded tiny GPT-2
base model (2 layers, 64 wide, ~125k parameters, byte-level tokenizer) on a corpus built at
run time from the Python standard library's docstrings. The base model is pretrained here, once,
with AdamW on the docstrings of other stdlib modules (``sassha_dist.integrations.embedded.
base_gpt2``: 300 steps, ~20-30 s on one CPU thread) and cached under ``$SASSHA_DIST_CACHE``
(default ``~/.cache/sassha_dist``) with the corpora; later runs load it. ``--from_scratch``
trains the same architecture from a random initialisation instead::

    accelerate launch --config_file launch/accelerate/cpu.yaml integrations/run_clm.py \\
        --optim sassha --output_dir outputs/clm

    # two CPU processes (DDP over gloo)
    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml integrations/run_clm.py \\
        --optim sassha --output_dir outputs/clm_ddp

    # a local model and plain-text files
    python integrations/run_clm.py --model_name_or_path path/to/gpt2 \\
        --train_file train.txt --validation_file valid.txt --block_size 512 --output_dir out

    # a model and a dataset from the hub (or a local dataset directory), on a GPU node
    accelerate launch --config_file launch/accelerate/multi_gpu.yaml integrations/run_clm.py \\
        --model_name_or_path gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \\
        --optim sassha --bf16 --block_size 512 --output_dir out

It evaluates the base (or untrained) model first, trains (the Trainer's progress bar and logs,
with SASSHA's diagnostics under ``sassha/*``), evaluates again, prints both losses and
perplexities, and writes ``loss_curve.png`` and ``all_results.json`` to ``--output_dir``.
On SIGTERM (``--preemption_signals`` for others, e.g. ``SIGTERM,SIGUSR1``) every process finishes
its step, the Trainer saves ``checkpoint-<step>`` in ``--output_dir`` and the job exits with status
75; rerun (or restart, or requeue) the same command and it resumes from the newest checkpoint
there, exactly. Bad options stop it before it builds anything, with one line ``run_clm.py: error:
...`` and exit status 2. Every ``TrainingArguments`` option works (``--help``); the defaults below
are for the embedded run on a small CPU. Without ``--learning_rate`` SASSHA uses 0.15 (0.6 with
``--from_scratch``) and any other optimizer 5e-3 (3e-3). SASSHA's ``optim_args`` default to
``rho=0.05,lazy_hessian=10,betas=0.9:0.999``, Sassha's own defaults, when fine-tuning and to
``rho=0.1,lazy_hessian=10,betas=0.9:0.99`` from scratch (plus ``eps=1e-2,fd_step=2.5e-2`` under
``--bf16``, see ``DEFAULT_SASSHA_ARGS_BF16``); ``--optim_args`` overrides them key by key.

Fine-tuning (the default run: 200 steps of 16 x 128 tokens, cosine with 5% warm-up,
max_grad_norm 1; eval perplexity on 256 validation blocks, 15.39 for the base model):

    SASSHA lr 0.15, betas 0.9:0.999, rho 0.05 (Sassha's defaults; the default)  14.49
    SASSHA lr 0.02 / 0.05 / 0.3, betas 0.9:0.999, rho 0.05                       14.95 / 14.74 / 14.36
    SASSHA lr 0.15, betas 0.9:0.999, rho 0.02                                    14.44
    SASSHA lr 0.05 / 0.1 / 0.15, betas 0.9:0.99, rho 0.1                         14.80 / 14.67 / 14.59
    AdamW  lr 1e-3 / 3e-3 / 5e-3 (the default), betas 0.9:0.999                  14.38 / 14.02 / 13.83

Sassha's defaults are within 1% of the best SASSHA setting tried, so the job keeps them. A
pretrained model does not want a large first step: lr 0.3 with rho 0.1 made the eval loss worse
after 30 steps (15.39 -> 15.86) where lr 0.15 with rho 0.05 improves it (15.24).

From scratch (``--from_scratch``, 200 steps, eval perplexity on all 363 validation blocks, 253
untrained), 14 SASSHA settings and 4 AdamW ones were tried:

    SASSHA lr 0.3, betas 0.965:0.99, rho 0.02 (the authors' GPT-2 setting)   20.4
    SASSHA lr 0.3, betas 0.965:0.99, rho 0.05 / 0.1                          18.4 / 17.3
    SASSHA lr 0.3, betas 0.9:0.99,   rho 0.05 / 0.1                          16.5 / 16.2
    SASSHA lr 0.6, betas 0.9:0.99,   rho 0.1 (the default)                   15.6
    AdamW  lr 3e-3 / 5e-3 / 1e-2 / 3e-2, betas 0.9:0.999                      16.7 / 24.4 / 23.1 / 24.1

Re-measured with this version (all 363 / the default 256 blocks): SASSHA's default 15.5 / 15.8,
AdamW lr 3e-3 17.8 / 18.2; the AdamW row above came from an earlier version.

A short run of a tiny model from scratch prefers a larger step, a shorter momentum memory and a
larger radius than GPT-2 small on OpenWebText. A SASSHA step costs about 2.2 forward-backward
passes (gradient, perturbed gradient, and a double backward every 10 steps), so per unit of
compute AdamW is ahead here.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import transformers
from transformers import HfArgumentParser, default_data_collator, set_seed
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType, get_last_checkpoint

import sassha_dist
from sassha_dist.integrations.embedded import (
    BlockDataset,
    base_gpt2,
    byte_tokenizer,
    group_into_blocks,
    stdlib_corpus,
    tiny_gpt2,
)
from sassha_dist.integrations.transformers import (
    SASSHA,
    SasshaTrainer,
    SasshaTrainingArguments,
    _check_arguments,
    parse_sassha_optim_args,
    quiet_deepspeed_cpu_warning,
    uses_deepspeed,
)
from sassha_dist.preemption import Preempted

logger = logging.getLogger("run_clm")

#: Learning rates used when --learning_rate is not given: fine-tuning (the default), and --from_scratch.
DEFAULT_LR = {
    "fine-tune": {SASSHA: 0.15, "other": 5e-3},
    "from scratch": {SASSHA: 0.6, "other": 3e-3},
}
#: SASSHA's optim_args for the embedded run; --optim_args overrides them key by key. Fine-tuning uses
#: Sassha's own defaults (the README's options table), written out; training from scratch the tuned
#: ones in the module docstring.
DEFAULT_SASSHA_ARGS = {
    "fine-tune": "rho=0.05,lazy_hessian=10,betas=0.9:0.999",
    "from scratch": "rho=0.1,lazy_hessian=10,betas=0.9:0.99",
}
#: Added under --bf16, for the finite-difference Hessians of FSDP2 and DeepSpeed. fd_step: the
#: parameters SASSHA sees are fp32 while the passes run in bf16 (SasshaTrainer refuses FSDP2 + bf16
#: without it). eps: bf16 gradients make 0.5% of the estimate underflow to exactly 0 on this model,
#: and eps=1e-4 then lets those coordinates diverge (loss 5.5 -> 670 in one step under DeepSpeed
#: ZeRO-2 bf16; see sassha_dist.hessian.hvp.curvature_underflow).
DEFAULT_SASSHA_ARGS_BF16 = "eps=1e-2,fd_step=2.5e-2"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A local model directory (or a cached hub name) to fine-tune. Default: the embedded "
            "tiny GPT-2 base model, pretrained once on other stdlib modules' docstrings and cached "
            "($SASSHA_DIST_CACHE)."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to use if not the model's (default: the byte tokenizer)."}
    )
    local_files_only: bool = field(
        default=True,
        metadata={"help": "Never download: load models and tokenizers from disk or the local cache only."},
    )
    torch_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads. Default: 1 for the embedded tiny model (its 64-wide matrices "
            "gain nothing from more, and extra threads stall on a busy machine), torch's default otherwise."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel. Default: 'eager' with --optim sassha (its exact Hessian-vector "
            "products need a double backward, which fused SDPA kernels lack), the model's default otherwise."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset for `datasets.load_dataset` (a hub name, or a local directory of "
            "text/json/csv/parquet files); needs `pip install datasets`. Its text column is used."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    text_column: str = field(
        default="text", metadata={"help": "The column of --dataset_name holding the text."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Plain-text training file. Default: the embedded stdlib corpus."}
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Plain-text validation file. Default: the last part of --train_file (see below)."},
    )
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Share of --train_file held out when there is no --validation_file."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    max_eval_blocks: int | None = field(
        default=256,
        metadata={
            "help": "Evaluate on at most this many blocks (the first ones); 0 or less: all. Cut further to a "
            "multiple of (processes x --per_device_eval_batch_size) where there are more, so that no process "
            "pads its last batch with repeated blocks (which would shift eval_loss with the process count)."
        },
    )


@dataclass
class ClmTrainingArguments(SasshaTrainingArguments):
    """``SasshaTrainingArguments`` with defaults for the embedded run."""

    output_dir: str | None = field(default="outputs/clm", metadata={"help": "Where outputs are written."})
    optim: str = field(default=SASSHA, metadata={"help": "'sassha' or any transformers OptimizerNames."})
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": f"Peak learning rate (default: {DEFAULT_LR['fine-tune'][SASSHA]:g} for sassha, "
            f"{DEFAULT_LR['fine-tune']['other']:g} otherwise; with --from_scratch "
            f"{DEFAULT_LR['from scratch'][SASSHA]:g} and {DEFAULT_LR['from scratch']['other']:g})."
        },
    )
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Micro-batch size per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine", metadata={"help": "Learning-rate schedule."}
    )
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (or a ratio < 1)."})
    weight_decay: float = field(default=2e-4, metadata={"help": "Decoupled weight decay (lr-scaled)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    eval_strategy: IntervalStrategy | str = field(
        default="steps", metadata={"help": "When to evaluate during training."}
    )
    eval_steps: float | None = field(default=25, metadata={"help": "Evaluate every N steps."})
    save_strategy: SaveStrategy | str = field(
        default="no", metadata={"help": "Checkpointing ('steps' for resumable runs)."}
    )
    from_scratch: bool = field(
        default=False,
        metadata={
            "help": "Train the embedded tiny GPT-2 from a random initialisation instead of fine-tuning its "
            "pretrained base model (with its own default lr and optim_args, see --learning_rate)."
        },
    )

    def __post_init__(self) -> None:
        if not self.use_cpu and not _has_accelerator():
            # Run on the CPU explicitly, so that several launched processes form a gloo DDP group
            # (accelerate's MULTI_CPU) instead of each training alone.
            self.use_cpu = True
        is_sassha = self.optim == SASSHA
        mode = "from scratch" if self.from_scratch else "fine-tune"
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[mode][SASSHA if is_sassha else "other"]
        if self.use_cpu and self.ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.ddp_backend = "gloo"  # under DeepSpeed, its CPU accelerator would ask for oneCCL
        if is_sassha:
            defaults = _pairs(DEFAULT_SASSHA_ARGS[mode])
            if self.bf16:
                defaults.update(_pairs(DEFAULT_SASSHA_ARGS_BF16))
            merged = {**defaults, **_pairs(self.optim_args)}
            self.optim_args = ",".join(f"{k}={v}" for k, v in merged.items())
        super().__post_init__()


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available()
        or (mps is not None and mps.is_available())
        or (xpu is not None and xpu.is_available())
    )


def _pairs(optim_args: str | None) -> dict[str, str]:
    pairs = {}
    for item in (optim_args or "").split(","):
        key, sep, value = item.partition("=")
        if item.strip():
            pairs[key.strip()] = value.strip() if sep else ""
    return pairs


def _hold_out(text: str, percentage: int) -> tuple[str, str]:
    """The last ``percentage``% of ``text`` (cut at a line break) as validation text."""
    if not 0 < percentage < 100:
        raise ValueError("--validation_split_percentage must be in (0, 100) without a validation split.")
    cut = len(text) * (100 - percentage) // 100
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def _read_dataset(data_args: DataArguments) -> tuple[str, str, str]:
    """(train text, validation text, description) from ``datasets.load_dataset``."""
    try:
        import datasets
    except ImportError:
        raise ImportError("--dataset_name needs the datasets library: pip install datasets") from None
    loaded = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    name = data_args.dataset_name + (
        f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else ""
    )
    if "train" not in loaded:
        raise ValueError(f"--dataset_name {name} has no train split (splits: {sorted(loaded)}).")

    def text_of(split: str) -> str:
        if data_args.text_column not in loaded[split].column_names:
            raise ValueError(
                f"--dataset_name {name} has no column {data_args.text_column!r} (columns: "
                f"{loaded[split].column_names}); pass --text_column."
            )
        return "\n\n".join(t for t in loaded[split][data_args.text_column] if t)

    for split in ("validation", "test"):
        if split in loaded:
            return text_of("train"), text_of(split), f"{name}, {split} split"
    percentage = data_args.validation_split_percentage
    train, validation = _hold_out(text_of("train"), percentage)
    return train, validation, f"{name} (last {percentage}% of train held out)"


def _check_arguments_early(
    model_args: ModelArguments, data_args: DataArguments, training_args: ClmTrainingArguments
) -> None:
    """What the arguments alone rule out, before any model or data is built (``ValueError``)."""
    if training_args.from_scratch and model_args.model_name_or_path is not None:
        raise ValueError(
            "--from_scratch trains the embedded tiny GPT-2 from a random initialisation; drop it to "
            f"fine-tune --model_name_or_path {model_args.model_name_or_path}."
        )
    if data_args.dataset_name is not None:
        if data_args.train_file is not None or data_args.validation_file is not None:
            raise ValueError("Pass either --dataset_name or --train_file/--validation_file, not both.")
    elif data_args.train_file is None and data_args.validation_file is not None:
        raise ValueError("--validation_file needs --train_file.")
    for option in ("train_file", "validation_file"):
        path = getattr(data_args, option)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{option} {path}: no such file.")
    needs_hold_out = data_args.validation_file is None and data_args.train_file is not None
    if needs_hold_out and not 0 < data_args.validation_split_percentage < 100:
        raise ValueError("--validation_split_percentage must be in (0, 100) without a validation split.")
    if data_args.block_size < 2:
        raise ValueError(f"Invalid --block_size {data_args.block_size}. Must be >= 2.")
    # The Trainer integration's own argument checks (DeepSpeed config, FSDP version, fp16).
    if training_args.optim == SASSHA:
        _check_arguments(training_args)


def _usage_error(message: str) -> NoReturn:
    """A command-line tool's answer to bad options: one line on stderr, exit status 2 (argparse's).

    Printed by the first process only, so a launch of several processes shows it once.
    """
    if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
        first_line = " ".join(message.split())
        print(f"run_clm.py: error: {first_line}", file=sys.stderr, flush=True)
    sys.exit(2)


def _raised_by_sassha_dist(error: BaseException) -> bool:
    """Whether ``error`` was raised by this library's own checks (then it is a configuration error)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(sassha_dist.__file__).resolve().parent
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def _read_texts(data_args: DataArguments) -> tuple[str, str, str]:
    """(train text, validation text, description)."""
    if data_args.dataset_name is not None:
        return _read_dataset(data_args)
    if data_args.train_file is None:
        corpus = stdlib_corpus()
        return (
            corpus.train,
            corpus.validation,
            f"Python standard-library docstrings (cached in {corpus.path})",
        )
    train = Path(data_args.train_file).read_text(encoding="utf-8")
    if data_args.validation_file is not None:
        return train, Path(data_args.validation_file).read_text(encoding="utf-8"), data_args.train_file
    train, validation = _hold_out(train, data_args.validation_split_percentage)
    return (
        train,
        validation,
        f"{data_args.train_file} (last {data_args.validation_split_percentage}% held out)",
    )


def _load_model_and_tokenizer(
    model_args: ModelArguments, training_args: ClmTrainingArguments, block_size: int, say
) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, description, what the first evaluation evaluates: "base" or "untrained")."""
    attn = model_args.attn_implementation
    if attn is None and training_args.optim == SASSHA:
        method = parse_sassha_optim_args(training_args.optim_args).get("hessian_method", "auto")
        attn = None if method == "finite_difference" else "eager"
    if model_args.model_name_or_path is None and not training_args.from_scratch:
        # The default: fine-tune the embedded base model (pretrained here once, then cached).
        path = base_gpt2(progress=say)
        model, tokenizer, _, _ = _load_model_and_tokenizer(
            replace(model_args, model_name_or_path=str(path)), training_args, block_size, say
        )
        config = model.config
        n_params = sum(p.numel() for p in model.parameters())
        description = (
            f"tiny GPT-2 base model ({config.n_layer} layers, width {config.n_embd}, {n_params:,} "
            f"parameters), pretrained with AdamW on the docstrings of other stdlib modules (cached in {path})"
        )
        return model, tokenizer, description, "base"
    if model_args.model_name_or_path is None:
        tokenizer = (
            byte_tokenizer()
            if model_args.tokenizer_name is None
            else transformers.AutoTokenizer.from_pretrained(
                model_args.tokenizer_name, local_files_only=model_args.local_files_only
            )
        )
        overrides = {"attn_implementation": attn} if attn else {}
        model = tiny_gpt2(
            seed=training_args.seed, vocab_size=len(tokenizer), n_positions=max(128, block_size), **overrides
        )
        n_params = sum(p.numel() for p in model.parameters())
        config = model.config
        description = (
            f"tiny GPT-2 ({config.n_layer} layers, width {config.n_embd}, {n_params:,} parameters) "
            "built from a config and trained FROM SCRATCH (--from_scratch: no pretrained weights)"
        )
        return model, tokenizer, description, "untrained"
    name = model_args.model_name_or_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or name, local_files_only=model_args.local_files_only
    )
    kwargs = {"attn_implementation": attn} if attn else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        name, local_files_only=model_args.local_files_only, **kwargs
    )
    if getattr(model, "loss_type", None) is None:
        # The class name did not name the loss (e.g. GPT2LMHeadModel): it is a causal LM, say so, so
        # the Trainer counts the shifted labels' tokens when it normalises the loss.
        model.loss_type = "ForCausalLM"
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    return model, tokenizer, f"{name} ({n_params:,} parameters, pretrained weights)", "base"


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _plot(log_history: list[dict], initial_loss: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [] if initial_loss is None else [(0, initial_loss)]
    evals += [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, ClmTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    # Bad options end here, before any model or data is built, with one line and exit status 2
    # (argparse's own errors, e.g. an unknown option, already do).
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(argv[0]))
        else:
            model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        _check_arguments_early(model_args, data_args, training_args)
    except (ValueError, NotImplementedError) as error:
        _usage_error(str(error))

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    logging.getLogger("sassha_dist").setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    if not uses_deepspeed(training_args):
        quiet_deepspeed_cpu_warning()
    main_process = training_args.process_index == 0
    say = print if main_process else (lambda *a, **k: None)
    set_seed(training_args.seed)
    threads = model_args.torch_threads
    if threads is None and model_args.model_name_or_path is None:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)

    started = time.time()
    model, tokenizer, model_description, initial = _load_model_and_tokenizer(
        model_args, training_args, data_args.block_size, say
    )
    block_size = min(data_args.block_size, getattr(model.config, "n_positions", data_args.block_size))
    train_text, validation_text, data_description = _read_texts(data_args)
    train_blocks = group_into_blocks(train_text, tokenizer, block_size)
    eval_blocks = group_into_blocks(validation_text, tokenizer, block_size)
    available = len(eval_blocks)
    if data_args.max_eval_blocks is not None and data_args.max_eval_blocks > 0:
        eval_blocks = eval_blocks[: data_args.max_eval_blocks]
    args = training_args
    # Every process evaluates whole batches: a process short of blocks would pad its last batch with
    # repeats (accelerate's even_batches), and the Trainer's eval_loss (a mean of batch means) would
    # count them, so 1 process and 2 would report different losses for the same blocks.
    per_round = args.world_size * args.per_device_eval_batch_size
    if args.world_size > 1 and len(eval_blocks) > per_round and len(eval_blocks) % per_round:
        eval_blocks = eval_blocks[: len(eval_blocks) - len(eval_blocks) % per_round]
    optimizer_description = str(getattr(args.optim, "value", args.optim))
    if args.optim == SASSHA:
        optimizer_description += f" ({args.optim_args})"
    optimizer_name = optimizer_description.split()[0]
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    say(f"Model:     {model_description}")
    say(
        f"Data:      {data_description}: {len(train_blocks):,} train blocks of {block_size} tokens; eval on "
        f"{len(eval_blocks):,} of its {available:,} validation blocks"
    )
    say(
        f"Optimizer: {optimizer_description}, lr {args.learning_rate:g} ({schedule}, warm-up "
        f"{args.warmup_steps:g}), weight decay {args.weight_decay:g}, max_grad_norm {args.max_grad_norm:g}; "
        f"{args.max_steps} steps of {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} "
        f"x {args.world_size} blocks"
    )

    try:
        trainer = SasshaTrainer(
            model=model,
            args=training_args,
            train_dataset=BlockDataset(train_blocks),
            eval_dataset=BlockDataset(eval_blocks),
            processing_class=tokenizer,
            data_collator=default_data_collator,
        )
    except (ValueError, NotImplementedError, TypeError) as error:
        if not _raised_by_sassha_dist(error):
            raise
        _usage_error(str(error))  # a configuration SASSHA refuses (from the accelerate config, say)

    label = {"base": "Base model", "untrained": "Untrained model"}[initial]
    initial_loss = None
    if trainer.is_deepspeed_enabled:
        # transformers cannot evaluate through DeepSpeed before train() builds the engine (ZeRO-1/2:
        # "ZeRO inference only makes sense with ZeRO Stage 3"; ZeRO-3 would train an inference engine).
        say(f"{label}: not evaluated under DeepSpeed (transformers evaluates only after train()).")
    else:
        initial_loss = trainer.evaluate(metric_key_prefix=initial)[f"{initial}_loss"]
        say(f"{label}: eval loss {initial_loss:.4f}, perplexity {_perplexity(initial_loss):.2f}")

    resume = training_args.resume_from_checkpoint
    if resume is None and os.path.isdir(training_args.output_dir):
        # A restarted or requeued job (say after a preemption) continues where it stopped.
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is not None:
            say(f"Resuming from {resume} (found in --output_dir; another --output_dir starts afresh)")
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    except Preempted as stop:  # the Trainer saved checkpoint-<step> in --output_dir
        preempted = stop
    else:
        preempted = None
    if preempted is not None:
        say(f"{preempted}; rerun the same command to resume")
        del trainer, model  # (the exception's traceback, which holds the trainer, is gone too)
        _shut_down_distributed()
        raise Preempted(preempted.signal)  # exit status 75: torchrun restarts, Slurm requeues
    trainer.save_model()
    final = trainer.evaluate()
    final_loss = final["eval_loss"]

    metrics = {
        **(
            {}
            if initial_loss is None
            else {f"{initial}_eval_loss": initial_loss, f"{initial}_perplexity": _perplexity(initial_loss)}
        ),
        "eval_loss": final_loss,
        "perplexity": _perplexity(final_loss),
        "train_loss": train_result.training_loss,
        "train_runtime": train_result.metrics.get("train_runtime", float("nan")),
        "total_runtime": time.time() - started,
        "steps": trainer.state.global_step,
        "eval_blocks": len(eval_blocks),
    }
    trainer.save_metrics("all", metrics)
    done = "Fine-tuned" if initial == "base" else "Trained"
    if trainer.is_world_process_zero():
        plot_path = Path(training_args.output_dir) / "loss_curve.png"
        start = "" if initial_loss is None else f"{metrics[f'{initial}_perplexity']:.1f} -> "
        title = (
            f"{optimizer_name}, {model_description.split(' (')[0]}: eval perplexity "
            f"{start}{metrics['perplexity']:.1f}"
        )
        _plot(trainer.state.log_history, initial_loss, plot_path, title)
        say(f"Loss curve: {plot_path}")
    if initial_loss is not None:
        say(f"{label}: eval loss {initial_loss:.4f}, perplexity {metrics[f'{initial}_perplexity']:.2f}")
    say(
        f"{done} ({trainer.state.global_step} steps of {optimizer_name}): eval loss {final_loss:.4f}, "
        f"perplexity {metrics['perplexity']:.2f}"
    )
    say(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))

    del trainer, model
    _shut_down_distributed()
    return metrics


def _shut_down_distributed() -> None:
    """Barrier, then destroy the process group; call it once the trainer and the model are freed.

    Freeing the DDP-wrapped model before its process group goes, then a barrier: a DDP reducer
    outliving its gloo group, or a rank leaving early, intermittently aborts at exit
    ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
