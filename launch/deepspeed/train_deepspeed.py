"""SASSHA under DeepSpeed ZeRO: a small runnable example (a tiny MLP on synthetic regression data).

GPUs (one process per GPU, NCCL)::

    deepspeed --num_gpus 2 launch/deepspeed/train_deepspeed.py --deepspeed_config launch/deepspeed/zero2.json

CPU (gloo; DeepSpeed compiles one op on first use, cached in TORCH_EXTENSIONS_DIR)::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/deepspeed/train_deepspeed.py \\
        --deepspeed_config launch/deepspeed/zero3.json --steps 20

``--save DIR`` writes a checkpoint at the end and ``--resume DIR`` continues from one
(``engine.save_checkpoint`` / ``load_checkpoint``: m, D, counters and probe position included).
"""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
from torch import nn

from sassha_dist.distributed.deepspeed import initialize


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deepspeed_config", required=True, help="a DeepSpeed JSON config (ZeRO 1, 2 or 3)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lazy-hessian", type=int, default=5)
    parser.add_argument(
        "--eps",
        type=float,
        default=1e-2,
        help="added to sqrt(D); under bf16 a finite difference can round to exactly zero curvature, "
        "so keep it well above the default 1e-4",
    )
    parser.add_argument("--save", default=None, help="save a checkpoint here at the end")
    parser.add_argument("--resume", default=None, help="resume from the latest checkpoint here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    if not on_gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("WORLD_SIZE", 1)))))

    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    sassha_kwargs = {"lr": args.lr, "rho": args.rho, "lazy_hessian": args.lazy_hessian, "eps": args.eps}
    engine, sassha = initialize(model, config, weight_decay=1e-4, **sassha_kwargs)
    if args.resume:
        engine.load_checkpoint(args.resume)

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    micro_batch, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    teacher = torch.Generator().manual_seed(1234)
    w_true = torch.randn(16, 1, generator=teacher)
    data = torch.Generator().manual_seed(rank)  # each rank its own shard of the data

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(micro_batch, 16, generator=data)
        y = torch.tanh(x @ w_true) + 0.05 * torch.randn(micro_batch, 1, generator=data)
        return x.to(engine.device, dtype), y.to(engine.device)

    for step in range(args.steps):
        micro_batches = [batch() for _ in range(accumulation)]
        closures = [(lambda x=x, y=y: nn.functional.mse_loss(engine(x).float(), y)) for x, y in micro_batches]
        loss = sassha.step(closures)
        report = sassha.last_report
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            refreshed = "refreshed" if report.hessian_refreshed else "-"
            print(
                f"step {engine.global_steps:4d}  loss {loss.item():.4f}  "
                f"|g| {float(report.grad_norm):.3f}  hessian {refreshed}",
                flush=True,
            )
    counters = sassha.optimizer.counters
    if rank == 0:
        print(f"ZeRO-{engine.zero_optimization_stage()} on {world} ranks, counters {counters}", flush=True)
    if args.save:
        engine.save_checkpoint(args.save)


if __name__ == "__main__":
    main()
