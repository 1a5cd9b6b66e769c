"""A small FSDP2 training job for the torchrun restart tests (tests/test_restart.py).

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 tests/restart_job.py \\
        --ckpt-root CKPT_DIR --final-out FINAL.pt --attempt-log LOG --steps 12 --save-every 3 --kill-at 7

Every attempt resumes from ``CKPT_DIR/latest`` (or starts fresh), trains to
``--steps`` with a sharded checkpoint every ``--save-every`` steps, and rank 0
writes the final full parameters to ``--final-out``. The batch of each step is a
function of the step number, so a resumed attempt sees the same data as an
uninterrupted run. On the first attempt only (``TORCHELASTIC_RESTART_COUNT``
is 0), rank ``--kill-rank`` SIGKILLs itself right after step ``--kill-at``
(``--kill-in-save``: at the start of that step's checkpoint write instead);
torchrun then stops the other rank and starts a second attempt. Rank 0
appends ``{"attempt": n, "resumed_from": step}`` to ``--attempt-log``.

Preemption (tests/test_preemption.py): the loop runs inside a
:class:`~sassha_dist.preemption.PreemptionGuard`, as a user's loop would. On a
fresh start, rank ``--signal-rank`` sends SIGTERM during step ``--signal-at``
(``--signal-in``: inside its gradient, perturbed or first finite-difference
pass, or inside that step's checkpoint write), to itself or
(``--signal-target launcher``) to torchrun, which forwards it to every worker.
A preempted job saves ``latest`` at the step it stopped after and exits with
``PREEMPTED_EXIT_CODE``; rank 0 then appends ``{"preempted_after": step}``.
The final file holds the parameters, the optimizer's ``m`` and ``D`` and its
counters.

The soak run (tests/soak.py) adds ``--fall-back`` (resume past a damaged newest
checkpoint, ``load_latest(..., fall_back=True)``) and ``--log-saves`` (rank 0
appends ``{"saved": step}`` after each checkpoint, the driver's progress report).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sassha_dist import Sassha, checkpoint
from sassha_dist.preemption import Preempted, PreemptionGuard

KW = {
    "lr": 0.05,
    "rho": 0.05,
    "lazy_hessian": 3,
    "n_samples": 1,
    "weight_decay": 0.01,
    "hessian_method": "finite_difference",
    "probe_mode": "global",
}


def make_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 1, generator=gen, dtype=torch.float64)
    return x.chunk(world)[rank], y.chunk(world)[rank]


def init_distributed(attempt: int) -> None:
    """``init_process_group("gloo")``, isolated per torchrun attempt.

    torchrun's rendezvous store outlives the workers and is shared by every
    attempt (the default since torch 2.5), but ``init_process_group`` keys its
    gloo addresses without the attempt, so a restarted rank can read the dead
    attempt's addresses and fail to connect (pytorch/pytorch#135712). Prefixing
    the store with the restart count gives each attempt its own keys; on one
    node every worker restarts together, so the count agrees across ranks.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group("gloo")
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    prefixed = dist.PrefixStore(f"sassha_restart_job/attempt_{attempt}", store)
    dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=world)


#: The closure call of a SASSHA step that runs each pass (finite differences: the first FD pass).
PASS_CALL = {"gradient": 1, "perturbed": 2, "fd": 3}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def intercept_save(action) -> None:
    """Run ``action`` inside the next checkpoint write, after its temporary directory exists."""
    original = dcp.save

    def save(*a, **k):
        dcp.save = original
        action()
        return original(*a, **k)

    dcp.save = save  # checkpoint.save calls it after creating the temporary directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt-root", required=True)
    parser.add_argument("--final-out", required=True)
    parser.add_argument("--attempt-log", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--kill-in-save", action="store_true")
    parser.add_argument("--signal-at", type=int, default=-1)
    parser.add_argument("--signal-rank", type=int, default=1)
    parser.add_argument("--signal-in", choices=[*PASS_CALL, "save"], default="gradient")
    parser.add_argument("--signal-target", choices=["self", "launcher"], default="self")
    parser.add_argument("--fall-back", action="store_true", help="resume past a damaged newest checkpoint")
    parser.add_argument("--log-saves", action="store_true", help="rank 0 logs {'saved': step} per save")
    parser.add_argument("--pass-delay", type=float, default=0.0, help="seconds each pass sleeps")
    parser.add_argument("--deadline", type=float, default=180.0, help="seconds before a stuck worker exits")
    args = parser.parse_args()
    # A worker stuck in a collective prints every thread's stack and exits: nothing outlives the test.
    faulthandler.dump_traceback_later(args.deadline, exit=True)
    # Handled from the start, as a real job would: a signal before the first step stops after it.
    with PreemptionGuard() as guard:
        train(args, guard)


def train(args: argparse.Namespace, guard: PreemptionGuard) -> None:
    torch.set_num_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    init_distributed(attempt)
    rank, world = dist.get_rank(), dist.get_world_size()
    doomed = attempt == 0 and rank == args.kill_rank

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = Sassha(model.parameters(), **KW)

    extra = checkpoint.load_latest(args.ckpt_root, model, optimizer, fall_back=args.fall_back)
    start = 0 if extra is None else extra["step"]

    def log(entry: dict) -> None:  # rank 0 appends one JSON line to the attempt log
        if rank == 0:
            with open(args.attempt_log, "a") as f:
                f.write(json.dumps(entry) + "\n")

    log({"attempt": attempt, "resumed_from": start})

    signalling = start == 0 and attempt == 0 and rank == args.signal_rank and args.signal_at > 0
    target = os.getppid() if args.signal_target == "launcher" else os.getpid()

    def preempt() -> None:
        os.kill(target, signal.SIGTERM)

    stopped_after = None
    for step in range(start + 1, args.steps + 1):
        x, y = local_batch(step, rank, world)
        calls = 0
        signal_now = signalling and step == args.signal_at

        def closure(x=x, y=y, model=model, signal_now=signal_now):
            nonlocal calls
            calls += 1
            time.sleep(args.pass_delay)
            if signal_now and calls == PASS_CALL.get(args.signal_in):
                preempt()
            return nn.functional.mse_loss(model(x), y)

        optimizer.step(closure)
        if signal_now and args.signal_in in PASS_CALL and calls < PASS_CALL[args.signal_in]:
            raise RuntimeError(f"step {step} made {calls} passes: it has no {args.signal_in} pass")
        if doomed and step == args.kill_at and not args.kill_in_save:
            die()
        if step % args.save_every == 0:
            if doomed and step == args.kill_at:
                intercept_save(die)
            if signal_now and args.signal_in == "save":
                intercept_save(preempt)
            checkpoint.save_checkpoint(args.ckpt_root, step, model, optimizer)
            if args.log_saves:
                log({"saved": step})
        if guard.should_stop():
            if step % args.save_every:
                checkpoint.save_checkpoint(args.ckpt_root, step, model, optimizer)
            stopped_after, received = step, guard.received
            break

    if stopped_after is None:
        full = checkpoint.full_state_dict(model, optimizer)
        if rank == 0:
            torch.save(
                {
                    "params": full["model"],
                    "state": full["optimizer"]["state"],
                    "counters": full["optimizer"]["sassha_counters"],
                },
                args.final_out,
            )
        del full
    else:
        log({"preempted_after": stopped_after})
    # Free the sharded model and optimizer before the process group: torn down the other way round,
    # a rank sometimes aborted at exit ("terminate called without an active exception").
    del model, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if stopped_after is not None:
        raise Preempted(received)


if __name__ == "__main__":
    main()
