"""Run tests/restart_job.py under torchrun (2 gloo ranks), bounded by a timeout.

Used by tests/test_restart.py (killed ranks) and tests/test_preemption.py (signals).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

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
    # Output to a file, not a pipe: a stuck worker (in its own session) cannot block the read, and the
    # job's own deadline (faulthandler, --deadline) ends any worker that outlives torchrun.
    with open(tmp / f"{name}.out", "a+") as output:
        start = output.tell()
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + TIMEOUT
        try:
            if terminate_after is not None:
                while proc.poll() is None and _lines(log) <= logged:
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(command, TIMEOUT)
                    time.sleep(0.05)
                time.sleep(terminate_after)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun (its workers have their own deadline)
            proc.wait()
            output.seek(start)
            pytest.fail(f"torchrun did not finish within {TIMEOUT} s:\n{output.read()[-4000:]}")
        output.seek(start)
        text = output.read()
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return Launch(proc.returncode, entries, root, out, text)


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
