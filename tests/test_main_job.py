"""The main job, end to end: ``accelerate launch ... integrations/run_clm.py --optim sassha``.

Each test launches real processes through ``accelerate launch`` with the configs
in ``launch/accelerate/``, exactly as the README does, with fewer steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SASSHA_DIST_CACHE=str(tmp_path / "cache"),  # the corpus is built from scratch here
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("ACCELERATE_USE_CPU", None)  # the configs and the script must manage on their own
    return env


def _run(
    command: list[str], tmp_path: Path, timeout: int, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**(extra_env or {}), **_env(tmp_path)}  # the caller's environment wins
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    )
    return result


def test_main_command_reduces_perplexity(tmp_path):
    out = tmp_path / "clm"
    result = _run(
        [
            *ACCELERATE, "--config_file", "launch/accelerate/cpu.yaml", "integrations/run_clm.py",
            "--optim", "sassha", "--output_dir", str(out),
            "--max_steps", "30", "--eval_strategy", "no", "--logging_steps", "5", "--disable_tqdm", "true",
        ],
        tmp_path,
        timeout=600,
    )  # fmt: skip
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["steps"] == 30
    assert metrics["untrained_perplexity"] > 150  # ~uniform over the byte vocabulary's used part
    assert metrics["perplexity"] < 0.5 * metrics["untrained_perplexity"], metrics
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert "FROM SCRATCH" in result.stdout and "perplexity" in result.stdout
    assert (tmp_path / "cache").is_dir()
    # The Trainer's logs carry SASSHA's diagnostics.
    assert "sassha/hessian_mean" in result.stdout


def test_main_job_under_deepspeed_zero2_bf16(tmp_path):
    """The main job through launch/accelerate/deepspeed_zero2.yaml (2 ranks, bf16, DeepSpeed on the CPU).

    The untrained evaluation is skipped (transformers evaluates through DeepSpeed only after
    train()); the byte-level model starts at ln(256) = 5.55 nats. Under --bf16 run_clm adds eps=1e-2:
    with eps=1e-4 the coordinates whose bf16 finite-difference estimate underflowed to 0 sent the
    loss from 5.5 to 670 in one step; with it 30 steps reach an eval loss of 3.3."""
    out = tmp_path / "clm"
    result = _run(
        [
            *ACCELERATE, "--config_file", "launch/accelerate/deepspeed_zero2.yaml",
            "--main_process_port", str(free_port()),
            "integrations/run_clm.py", "--optim", "sassha", "--bf16", "--output_dir", str(out),
            "--max_steps", "30", "--eval_strategy", "no", "--logging_steps", "10", "--disable_tqdm", "true",
        ],
        tmp_path,
        timeout=600,
        extra_env={"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions")},
    )  # fmt: skip
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["steps"] == 30 and "untrained_perplexity" not in metrics
    assert metrics["eval_loss"] < 0.75 * math.log(256), metrics
    assert "eps=1e-2" in result.stdout and "underflowed" not in result.stderr + result.stdout


_RANK_SCRIPT = textwrap.dedent(
    """
    import gc
    import sys
    import torch
    import torch.distributed as dist
    from sassha_dist.integrations.embedded import BlockDataset, tiny_gpt2
    from sassha_dist.integrations.transformers import SasshaTrainer, SasshaTrainingArguments

    torch.set_num_threads(1)
    out, batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    blocks = torch.randint(0, 256, (48, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_gpt2(seed=0, n_positions=16).double()
    args = SasshaTrainingArguments(
        output_dir=out, optim="sassha", optim_args="rho=0.05,lazy_hessian=2,probe_mode=global",
        learning_rate=0.05, weight_decay=0.1, max_steps=3, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, train_sampling_strategy="sequential", max_grad_norm=1.0,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1,
    )
    trainer = SasshaTrainer(model=model, args=args, train_dataset=BlockDataset(blocks))
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    torch.save(
        {
            "params": {n: p.detach() for n, p in model.named_parameters()},
            "strategy": type(optimizer.strategy).__name__,
            "counters": dict(optimizer.counters),
            "world": args.world_size,
        },
        f"{out}/rank{args.process_index}.pt",
    )
    if dist.is_initialized():
        # Free the DDP-wrapped model before its gloo group: a reducer outliving the group
        # intermittently aborts the rank at exit (1 run in 12 without this, 0 in 24 with it).
        del trainer, optimizer, model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    """
)


def test_ddp_through_accelerate_matches_one_process(tmp_path):
    """2 gloo ranks x micro-batch 2 x 2 accumulation steps against 1 process x 4 x 2: the same 8 blocks
    per step. With global probes (the same z on every rank) the averaged Hessian estimate is the
    one-process estimate; only the summation order differs (per-rank halves, then the all-reduce).

    float64, because the preconditioner 1/(sqrt(D) + eps) amplifies rounding where a one-probe D
    is tiny: in float32 the same comparison differs by up to 1.2e-4 on weights of size 0.08,
    in float64 by 2e-13, so rtol=1e-9, atol=1e-11 has a 50x margin."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    _run(
        [
            *ACCELERATE,
            "--config_file",
            "launch/accelerate/cpu_ddp.yaml",
            "--main_process_port",
            str(free_port()),
            str(script),
            str(ddp),
            "2",
            "2",
        ],
        tmp_path,
        timeout=600,
    )
    _run([sys.executable, str(script), str(single), "4", "2"], tmp_path, timeout=600)
    ranks = [torch.load(ddp / f"rank{r}.pt") for r in range(2)]
    reference = torch.load(single / "rank0.pt")
    assert [r["world"] for r in ranks] == [2, 2] and reference["world"] == 1
    assert [r["strategy"] for r in ranks] == ["Replicated", "Replicated"]
    assert ranks[0]["counters"] == ranks[1]["counters"] == reference["counters"]
    for name, value in reference["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-9, atol=1e-11, msg=name)


def test_dataset_name_trains_on_a_local_datasets_directory(tmp_path):
    """--dataset_name goes through datasets.load_dataset (here a local directory with train and
    validation text files, offline): the description names the dataset's validation split, and
    training on it lowers the evaluation loss from the untrained model's."""
    data = tmp_path / "data"
    data.mkdir()
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "tiny",
        "models",
        "learn",
        "bytes",
    ]
    gen = torch.Generator().manual_seed(0)
    for split, rows in (("train", 400), ("validation", 40)):
        picks = torch.randint(0, len(words), (rows, 12), generator=gen).tolist()
        (data / f"{split}.txt").write_text("\n".join(" ".join(words[i] for i in row) for row in picks))
    out = tmp_path / "clm"
    result = _run(
        [
            sys.executable, "integrations/run_clm.py", "--dataset_name", str(data), "--output_dir", str(out),
            "--block_size", "64", "--max_steps", "20", "--eval_strategy", "no", "--disable_tqdm", "true",
        ],
        tmp_path,
        timeout=600,
        extra_env={"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")},
    )  # fmt: skip
    assert f"{data}, validation split" in result.stdout
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["eval_loss"] < 0.75 * metrics["untrained_eval_loss"], metrics
