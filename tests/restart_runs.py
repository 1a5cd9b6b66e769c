"""Run tests/restart_job.py under torchrun (2 gloo ranks), bounded by a timeout.

Used by tests/test_restart.py (killed ranks) and tests/test_preemption.py (signals).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.helpers import run_signalled

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "restart_job.py"
TIMEOUT = 240  # one torchrun launch, every attempt included
DEADLINE = 100  # each worker (faulthandler in the job)


@dataclass
class Launch:
    returncode: int
    log: list[dict]  # the attempt log so far: {"attempt", "resumed_from"} and {"preempted_after"} lines
    root: Path  # the checkpoint root
    out: Path  # the final file (params, optimizer state, counters), written by a run that finished
    output: str  # torchrun's and the workers' output

    def final(self) -> dict:
        return torch.load(self.out, weights_only=True)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def launch(
    tmp: Path, name: str, *job_args: str, max_restarts: int = 1, terminate_after: float | None = None
) -> Launch:
    """One ``torchrun --standalone --nproc-per-node 2`` of the job; ``terminate_after`` sends torchrun
    SIGTERM that many seconds after the job's first attempt logged its start (as Slurm would)."""
    root, out, log = tmp / f"{name}-ckpt", tmp / f"{name}.pt", tmp / f"{name}.jsonl"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(max_restarts),
        "--monitor-interval",
        "0.2",
        str(JOB),
        "--ckpt-root",
        str(root),
        "--final-out",
        str(out),
        "--attempt-log",
        str(log),
        *job_args,
        "--deadline",
        str(DEADLINE),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logged = _lines(log)
    started = None if terminate_after is None else (lambda _: _lines(log) > logged)
    # The job's own deadline (faulthandler, --deadline) ends any worker that outlives torchrun.
    returncode, text = run_signalled(
        command, tmp / f"{name}.out", env, started, delay=terminate_after or 0.0, timeout=TIMEOUT
    )
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return Launch(returncode, entries, root, out, text)


def assert_identical(final: dict, expected: dict) -> None:
    """Bit for bit: parameters, the optimizer's per-parameter state and its counters."""
    assert final["counters"] == expected["counters"]
    assert list(final["params"]) == list(expected["params"])
    for name, value in final["params"].items():
        assert torch.equal(value, expected["params"][name]), name
    assert list(final["state"]) == list(expected["state"])
    for name, state in final["state"].items():
        assert list(state) == list(expected["state"][name]), name
        for key, value in state.items():
            other = expected["state"][name][key]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, (name, key)


def assert_same_final(final: dict, expected: dict) -> None:
    """:func:`assert_identical`, at the end of the default 12 steps (4 Hessian refreshes)."""
    assert final["counters"] == {"global_step": 12, "hessian_refreshes": 4, "skipped_steps": 0}
    assert_identical(final, expected)
