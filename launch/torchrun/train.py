"""A small model trained end to end with SASSHA under torchrun: DDP, FSDP2 or FSDP1.

    torchrun --standalone --nproc_per_node 2 launch/torchrun/train.py --engine fsdp2 --steps 50

Runs on CPU (gloo) or GPUs (nccl, one per process). The model is a tiny
residual MLP regressing a fixed random teacher, so nothing is downloaded.

With ``--ckpt-dir`` it writes a restart-safe sharded checkpoint every
``--save-every`` steps and at the end, and resumes from the newest one when it
starts, so a restarted or requeued job continues where it stopped; each step's
batch is a function of the step number, so the resumed run is the
uninterrupted one. On SIGTERM (``--preempt-signals`` adds others, e.g. SIGUSR1
for Slurm's ``--signal``) every rank finishes the step in flight, the job saves
it and exits with status 75 (``sassha_dist.preemption.PREEMPTED_EXIT_CODE``),
which ``torchrun --max-restarts`` restarts and launch/slurm/sassha.sbatch
requeues. ``--export`` writes the final model and optimizer state to one file.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from sassha_dist import Sassha, checkpoint
from sassha_dist.distributed import FlatShard
from sassha_dist.preemption import DEFAULT_SIGNALS, PREEMPTED_EXIT_CODE, PreemptionGuard, parse_signals


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


def build_model(width: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*[Block(width) for _ in range(depth)], nn.Linear(width, 1))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["ddp", "fsdp2", "fsdp1"], default="ddp")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lazy-hessian", type=int, default=5)
    parser.add_argument("--ckpt-dir", help="checkpoint root: save there, and resume from its latest")
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument(
        "--preempt-signals",
        default=",".join(DEFAULT_SIGNALS),
        help="signals that mean 'save and stop after this step' (comma-separated, e.g. SIGTERM,SIGUSR1)",
    )
    parser.add_argument("--export", help="write the final model and optimizer state to this file")
    args = parser.parse_args()
    if args.save_every < 1:
        parser.error(f"Invalid --save-every {args.save_every}. Must be >= 1.")
    try:
        args.preempt_signals = parse_signals(args.preempt_signals)
    except ValueError as error:
        parser.error(str(error))
    return args


def train(args: argparse.Namespace, guard: PreemptionGuard) -> bool:
    """Train to ``--steps``; ``False`` when a preemption signal stopped it first (after saving)."""
    cuda = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # identical initial weights on every rank
    model = build_model(args.width, args.depth).to(device)
    teacher = build_model(args.width, 1).to(device)
    strategy = None
    if args.engine == "ddp":
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    elif args.engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, device_id=device, use_orig_params=True)
        strategy = FlatShard(model)

    optimizer = Sassha(
        model.parameters(), lr=args.lr, rho=args.rho, lazy_hessian=args.lazy_hessian, strategy=strategy
    )
    if rank == 0:
        print(
            f"engine={args.engine} world={world} strategy={type(optimizer.strategy).__name__} "
            f"hessian={optimizer.hessian_method} probes={optimizer.probe_mode}",
            flush=True,
        )
    resumed = checkpoint.load_latest(args.ckpt_dir, model, optimizer) if args.ckpt_dir else None
    start = 0 if resumed is None else resumed["step"]
    if rank == 0 and resumed is not None:
        print(f"resumed from {args.ckpt_dir} at step {start}", flush=True)
    generator = torch.Generator(device=device)
    for step in range(start, args.steps):
        generator.manual_seed(1000 + step * world + rank)  # each rank its own data, a function of the step
        x = torch.randn(args.batch, args.width, device=device, generator=generator)
        with torch.no_grad():
            y = teacher(x)
        loss = optimizer.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
        done = step + 1
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % 10 == 0 or done == args.steps):
            print(f"step {step:4d}  loss {mean_loss.item() / world:.5f}", flush=True)
        stop = guard.should_stop()
        if args.ckpt_dir and (stop or done % args.save_every == 0 or done == args.steps):
            checkpoint.save_checkpoint(args.ckpt_dir, done, model, optimizer)
        if stop:
            if rank == 0:
                where = f"saved to {args.ckpt_dir}" if args.ckpt_dir else "not saved (no --ckpt-dir)"
                print(f"preempted after step {done}, {where}; exit {PREEMPTED_EXIT_CODE}", flush=True)
            return False
    if args.export:
        checkpoint.export_full(args.export, model, optimizer)
    return True


def main() -> None:
    args = parse_args()
    # Handled from the start: a signal before the first step stops the job after it.
    with PreemptionGuard(args.preempt_signals) as guard:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # The model, its DDP/FSDP wrappers and the optimizer are freed when train() returns,
        # before the process group goes: a DDP reducer outliving its gloo group can hang at exit.
        finished = train(args, guard)
        dist.barrier()
        dist.destroy_process_group()
    # Skip interpreter teardown: with gloo under torchrun, C++ destructors at exit intermittently
    # abort ("terminate called without an active exception") after a clean shutdown.
    sys.stdout.flush()
    os._exit(0 if finished else PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
