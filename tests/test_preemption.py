"""Preemption: SIGTERM mid-training loses nothing (sassha_dist.preemption).

The torchrun tests run tests/restart_job.py (FSDP2, 2 gloo ranks, 12 steps, a
sharded checkpoint every 3, finite-difference Hessians every 3 steps, the loop
inside a PreemptionGuard) and send SIGTERM at chosen points of a step: inside
its gradient pass, its perturbed pass (the parameters at w + eps), its first
finite-difference pass, inside a checkpoint write, and at a random moment from
outside. Every case must end with exactly (``torch.equal``) the parameters,
``m``, ``D`` and counters of an uninterrupted run, and must resume from the
step it stopped after: the step in flight finishes, so nothing is lost. Same W,
same shards and a bit-identical restored state leave nothing to differ, hence
no tolerance.
"""

from __future__ import annotations

import os
import random
import signal
import threading

import pytest
import torch.distributed as dist

from sassha_dist import checkpoint
from sassha_dist.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionGuard, parse_signals
from tests.distributed import run_ranks
from tests.restart_runs import assert_same_final, launch

# -- the guard on its own ------------------------------------------------------------------------------


def test_parse_signals_accepts_names_numbers_and_lists():
    assert parse_signals("SIGTERM,usr1") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals(["TERM", int(signal.SIGUSR2), signal.SIGTERM]) == (signal.SIGTERM, signal.SIGUSR2)
    assert parse_signals("") == ()


@pytest.mark.parametrize(
    ("spec", "match"), [("SIGTERMX", "Must be a signal name"), ("SIGKILL", "cannot be handled")]
)
def test_parse_signals_names_the_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_signals(spec)


def test_guard_records_the_signal_and_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard("SIGTERM,SIGUSR1") as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)  # handled at the next bytecode boundary: the process lives
        assert guard.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.received == signal.SIGUSR1  # the first one is kept
        assert guard.should_stop()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_guard_refuses_a_worker_thread():
    errors = []

    def enter():
        try:
            with PreemptionGuard():
                pass
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


def test_preempted_exits_with_the_restartable_status():
    with pytest.raises(SystemExit) as exit_info:
        raise Preempted(signal.SIGTERM)
    assert exit_info.value.code == PREEMPTED_EXIT_CODE == 75
    assert "SIGTERM" in str(exit_info.value)


def _agree(rank: int, world: int, signalled_rank: int) -> list[bool]:
    with PreemptionGuard() as guard:
        first = guard.should_stop()
        if rank == signalled_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        dist.barrier()  # the signal reached only one rank, before the next step boundary
        return [first, guard.should_stop(), guard.received is not None]


def test_every_rank_stops_when_one_rank_is_signalled():
    results = run_ranks(_agree, 2, 1, timeout=60)
    assert results == [[False, True, False], [False, True, True]]


# -- a real 2-rank job under torchrun --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "rank", "at"),
    [
        ("gradient", 0, 2),
        ("perturbed", 1, 5),  # the parameters sit at w + eps when the signal lands
        ("fd", 1, 7),  # step 7 refreshes the Hessian: the signal lands in its first FD pass
        ("save", 1, 9),  # inside the step-9 checkpoint write, after its temporary directory exists
    ],
)
def test_sigterm_in_a_step_finishes_it_saves_and_restarts_exactly(uninterrupted, tmp_path, where, rank, at):
    """The signalled rank and its peer stop after the step in flight, save it, exit with the
    restartable status; torchrun restarts them and the run resumes from that very step."""
    run = launch(tmp_path, where, "--signal-at", str(at), "--signal-in", where, "--signal-rank", str(rank))
    assert run.returncode == 0, run.output[-4000:]
    assert run.log == [
        {"attempt": 0, "resumed_from": 0},
        {"preempted_after": at},
        {"attempt": 1, "resumed_from": at},
    ]
    assert f"(exitcode: {PREEMPTED_EXIT_CODE})" in run.output  # torchrun logs the first attempt's status
    assert_same_final(run.final(), uninterrupted)
    assert checkpoint.latest_checkpoint(run.root) == run.root / "step_00000012"


def test_sigterm_to_torchrun_stops_every_rank_and_a_relaunch_resumes(uninterrupted, tmp_path):
    """Slurm's case: torchrun itself gets SIGTERM (here from rank 0, inside the first FD pass of
    step 4), forwards it to both workers and exits without restarting; both workers finish the
    step and save it. A second launch, as a requeue would, resumes from step 4."""
    args = ("--signal-at", "4", "--signal-in", "fd", "--signal-rank", "0", "--signal-target", "launcher")
    first = launch(tmp_path, "launcher", *args)
    assert first.returncode != 0  # torchrun exits with an error when it is signalled
    assert first.log == [{"attempt": 0, "resumed_from": 0}, {"preempted_after": 4}]
    assert checkpoint.latest_checkpoint(first.root) == first.root / "step_00000004"
    second = launch(tmp_path, "launcher", *args)
    assert second.returncode == 0, second.output[-4000:]
    assert second.log[2:] == [{"attempt": 0, "resumed_from": 4}]
    assert_same_final(second.final(), uninterrupted)


def test_sigterm_at_a_random_moment_loses_nothing(uninterrupted, tmp_path):
    """SIGTERM to torchrun at a random moment of training (each pass sleeps 40 ms, so the 12 steps
    last ~1.2 s and the moment falls inside a pass, a save or between steps); relaunched until it
    finishes, the run ends exactly where an uninterrupted one does, having resumed from the step it
    stopped after."""
    delay = random.uniform(0.0, 1.2)
    args = ("--pass-delay", "0.04")
    run = launch(tmp_path, "random", *args, terminate_after=delay)
    launches = 1
    while run.returncode != 0 and launches < 3:
        run = launch(tmp_path, "random", *args)
        launches += 1
    assert run.returncode == 0, f"{delay=:.3f}\n{run.output[-4000:]}"
    for entry, following in zip(run.log, run.log[1:]):  # every stop saved the step it stopped after
        if "preempted_after" in entry:
            assert following["resumed_from"] == entry["preempted_after"], (delay, run.log)
    assert_same_final(run.final(), uninterrupted)
