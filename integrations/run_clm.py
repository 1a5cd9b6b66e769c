#!/usr/bin/env python
"""Causal-LM training with the Hugging Face Trainer and ``--optim sassha``, in the style of
transformers' ``examples/pytorch/language-modeling/run_clm.py``.

With no model or data arguments it needs no download: it trains the embedded tiny GPT-2
(2 layers, 64 wide, ~125k parameters, built from a config, **from scratch**, no pretrained
weights) on a corpus built at run time from the Python standard library's docstrings, with a
byte-level tokenizer::

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

It evaluates the untrained model first, trains (the Trainer's progress bar and logs, with
SASSHA's diagnostics under ``sassha/*``), evaluates again, prints both losses and
perplexities, and writes ``loss_curve.png`` and ``all_results.json`` to ``--output_dir``.
Every ``TrainingArguments`` option works (``--help``); the defaults below are tuned for the
embedded run on a small CPU. Without ``--learning_rate`` SASSHA uses 0.6 and any other
optimizer 3e-3; SASSHA's defaults ``rho=0.1,lazy_hessian=10,betas=0.9:0.99`` (plus
``eps=1e-2,fd_step=2.5e-2`` under ``--bf16``, see ``DEFAULT_SASSHA_ARGS_BF16``) can be
overridden key by key with ``--optim_args``.

Tuning (embedded run, 200 steps of 16 x 128 tokens, cosine with 5% warm-up, max_grad_norm
1; eval perplexity, 253 untrained), 14 SASSHA settings and 4 AdamW ones were tried:

    SASSHA lr 0.3, betas 0.965:0.99, rho 0.02 (the authors' GPT-2 setting)   20.4
    SASSHA lr 0.3, betas 0.965:0.99, rho 0.05 / 0.1                          18.4 / 17.3
    SASSHA lr 0.3, betas 0.9:0.99,   rho 0.05 / 0.1                          16.5 / 16.2
    SASSHA lr 0.6, betas 0.9:0.99,   rho 0.1 (the default)                   15.6
    AdamW  lr 3e-3 / 5e-3 / 1e-2 / 3e-2, betas 0.9:0.999                      16.7 / 24.4 / 23.1 / 24.1

A short run of a tiny model prefers a shorter momentum memory and a larger radius than
GPT-2 small on OpenWebText. A SASSHA step costs about 2.2 forward-backward passes
(gradient, perturbed gradient, and a double backward every 10 steps), so per unit of compute
AdamW is ahead here.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import HfArgumentParser, default_data_collator, set_seed
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from sassha_dist.integrations.embedded import (
    BlockDataset,
    byte_tokenizer,
    group_into_blocks,
    stdlib_corpus,
    tiny_gpt2,
)
from sassha_dist.integrations.transformers import (
    SASSHA,
    SasshaTrainer,
    SasshaTrainingArguments,
    parse_sassha_optim_args,
)

logger = logging.getLogger("run_clm")

#: Learning rates used when --learning_rate is not given.
DEFAULT_LR = {SASSHA: 0.6, "other": 3e-3}
#: SASSHA's optim_args for the embedded run; --optim_args overrides them key by key.
DEFAULT_SASSHA_ARGS = "rho=0.1,lazy_hessian=10,betas=0.9:0.99"
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
            "tiny GPT-2, built from a config and trained from scratch."
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
        default=None, metadata={"help": "Evaluate on at most this many blocks (default: all)."}
    )


@dataclass
class ClmTrainingArguments(SasshaTrainingArguments):
    """``SasshaTrainingArguments`` with defaults for the embedded run."""

    output_dir: str | None = field(default="outputs/clm", metadata={"help": "Where outputs are written."})
    optim: str = field(default=SASSHA, metadata={"help": "'sassha' or any transformers OptimizerNames."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate (default: 0.6 for sassha, 3e-3 otherwise)."}
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

    def __post_init__(self) -> None:
        if not self.use_cpu and not _has_accelerator():
            # Run on the CPU explicitly, so that several launched processes form a gloo DDP group
            # (accelerate's MULTI_CPU) instead of each training alone.
            self.use_cpu = True
        is_sassha = self.optim == SASSHA
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[SASSHA if is_sassha else "other"]
        if self.use_cpu and self.ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.ddp_backend = "gloo"  # under DeepSpeed, its CPU accelerator would ask for oneCCL
        if is_sassha:
            defaults = _pairs(DEFAULT_SASSHA_ARGS)
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


def _read_texts(data_args: DataArguments) -> tuple[str, str, str]:
    """(train text, validation text, description)."""
    if data_args.dataset_name is not None:
        if data_args.train_file is not None or data_args.validation_file is not None:
            raise ValueError("Pass either --dataset_name or --train_file/--validation_file, not both.")
        return _read_dataset(data_args)
    if data_args.train_file is None:
        if data_args.validation_file is not None:
            raise ValueError("--validation_file needs --train_file.")
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
    model_args: ModelArguments, training_args: ClmTrainingArguments, block_size: int
):
    attn = model_args.attn_implementation
    if attn is None and training_args.optim == SASSHA:
        method = parse_sassha_optim_args(training_args.optim_args).get("hessian_method", "auto")
        attn = None if method == "finite_difference" else "eager"
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
            "built from a config and trained FROM SCRATCH (no pretrained weights)"
        )
        return model, tokenizer, description
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
    return model, tokenizer, f"{name} ({n_params:,} parameters, pretrained weights)"


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _plot(log_history: list[dict], untrained_loss: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [] if untrained_loss is None else [(0, untrained_loss)]
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
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    logging.getLogger("sassha_dist").setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    main_process = training_args.process_index == 0
    say = print if main_process else (lambda *a, **k: None)
    set_seed(training_args.seed)
    threads = model_args.torch_threads
    if threads is None and model_args.model_name_or_path is None:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)

    started = time.time()
    model, tokenizer, model_description = _load_model_and_tokenizer(
        model_args, training_args, data_args.block_size
    )
    block_size = min(data_args.block_size, getattr(model.config, "n_positions", data_args.block_size))
    train_text, validation_text, data_description = _read_texts(data_args)
    train_blocks = group_into_blocks(train_text, tokenizer, block_size)
    eval_blocks = group_into_blocks(validation_text, tokenizer, block_size)
    if data_args.max_eval_blocks is not None:
        eval_blocks = eval_blocks[: data_args.max_eval_blocks]
    args = training_args
    optimizer_description = str(getattr(args.optim, "value", args.optim))
    if args.optim == SASSHA:
        optimizer_description += f" ({args.optim_args})"
    optimizer_name = optimizer_description.split()[0]
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    say(f"Model:     {model_description}")
    say(
        f"Data:      {data_description}: {len(train_blocks):,} train / {len(eval_blocks):,} eval blocks "
        f"of {block_size} tokens"
    )
    say(
        f"Optimizer: {optimizer_description}, lr {args.learning_rate:g} ({schedule}, warm-up "
        f"{args.warmup_steps:g}), weight decay {args.weight_decay:g}, max_grad_norm {args.max_grad_norm:g}; "
        f"{args.max_steps} steps of {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} "
        f"x {args.world_size} blocks"
    )

    trainer = SasshaTrainer(
        model=model,
        args=training_args,
        train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(eval_blocks),
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    untrained_loss = None
    if trainer.is_deepspeed_enabled:
        # transformers cannot evaluate through DeepSpeed before train() builds the engine (ZeRO-1/2:
        # "ZeRO inference only makes sense with ZeRO Stage 3"; ZeRO-3 would train an inference engine).
        say("Untrained model: not evaluated under DeepSpeed (transformers evaluates only after train()).")
    else:
        untrained_loss = trainer.evaluate(metric_key_prefix="untrained")["untrained_loss"]
        say(f"Untrained model: eval loss {untrained_loss:.4f}, perplexity {_perplexity(untrained_loss):.2f}")

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    final = trainer.evaluate()
    final_loss = final["eval_loss"]

    metrics = {
        **(
            {}
            if untrained_loss is None
            else {"untrained_eval_loss": untrained_loss, "untrained_perplexity": _perplexity(untrained_loss)}
        ),
        "eval_loss": final_loss,
        "perplexity": _perplexity(final_loss),
        "train_loss": train_result.training_loss,
        "train_runtime": train_result.metrics.get("train_runtime", float("nan")),
        "total_runtime": time.time() - started,
        "steps": trainer.state.global_step,
    }
    trainer.save_metrics("all", metrics)
    if trainer.is_world_process_zero():
        plot_path = Path(training_args.output_dir) / "loss_curve.png"
        start = "" if untrained_loss is None else f"{metrics['untrained_perplexity']:.1f} -> "
        title = (
            f"{optimizer_name}, {model_description.split(' (')[0]}: eval perplexity "
            f"{start}{metrics['perplexity']:.1f}"
        )
        _plot(trainer.state.log_history, untrained_loss, plot_path, title)
        say(f"Loss curve: {plot_path}")
    if untrained_loss is not None:
        say(
            f"Untrained model: eval loss {untrained_loss:.4f}, "
            f"perplexity {metrics['untrained_perplexity']:.2f}"
        )
    say(
        f"After {trainer.state.global_step} steps of {optimizer_name}: eval loss {final_loss:.4f}, "
        f"perplexity {metrics['perplexity']:.2f}"
    )
    say(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))

    if dist.is_available() and dist.is_initialized():
        # Free the DDP-wrapped model before its process group goes, then barrier: a DDP reducer
        # outliving its gloo group, or a rank leaving early, intermittently aborts at exit
        # ("terminate called without an active exception").
        del trainer, model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
