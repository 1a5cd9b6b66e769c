"""Soak: a long 2-rank job under faults ends bit-identical to an uninterrupted run. ``pytest -m soak``.

Not in the default run (tests/conftest.py skips it unless ``-m`` names ``soak``): it takes minutes.
tests/restart_job.py (FSDP2, 2 gloo ranks, finite-difference Hessians every 3 steps) trains for
``SOAK_STEPS`` steps (default 3000) with a checkpoint every 50, under ``torchrun --max-restarts``.
A driver SIGKILLs a random rank at 5 random points of training (chosen as steps, reached as the job
reports its saves, plus a random delay, so a kill lands inside a step or a save) and, once, right
after a kill and before the restarted ranks load anything, damages the newest checkpoint (one
flipped byte in a shard file). Each time torchrun restarts both ranks, which resume from ``latest``
(``load_latest(..., fall_back=True)``: past the damaged one, to the checkpoint before it). The run
must end with exactly (``torch.equal``) the weights, ``m``, ``D`` and counters of an uninterrupted
run of the same job. ``SOAK_SEED`` fixes the faults' random choices (printed on every run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.restart_runs import JOB, ROOT, assert_identical, launch

STEPS = int(os.environ.get("SOAK_STEPS", "3000"))
SAVE_EVERY = 50
KILLS = 5
DEADLINE = 1800  # each worker (faulthandler in the job)


def _entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _saved(log: Path) -> int:
    return max((e["saved"] for e in _entries(log) if "saved" in e), default=0)


def _flip_a_byte(checkpoint_dir: Path) -> Path:
    shard = next(p for p in sorted(checkpoint_dir.iterdir()) if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.soak
def test_soak_kills_and_a_corrupt_checkpoint_end_bit_identical(tmp_path):
    seed = int(os.environ.get("SOAK_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    print(f"soak: SOAK_SEED={seed} SOAK_STEPS={STEPS}")
    job_args = ["--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--deadline", str(DEADLINE)]

    started = time.monotonic()
    plain = launch(tmp_path, "plain", *job_args)
    assert plain.returncode == 0, plain.output[-4000:]
    plain_seconds = time.monotonic() - started

    root, out, log = tmp_path / "soak-ckpt", tmp_path / "soak.pt", tmp_path / "soak.jsonl"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", str(KILLS), "--monitor-interval", "0.2", str(JOB),
        "--ckpt-root", str(root), "--final-out", str(out), "--attempt-log", str(log),
        "--fall-back", "--log-saves", *job_args,
    ]  # fmt: skip
    kill_steps = sorted(rng.sample(range(SAVE_EVERY, STEPS - SAVE_EVERY, SAVE_EVERY), KILLS))
    corrupt_at = rng.randrange(KILLS)
    kills, corrupted = [], None
    started = time.monotonic()
    with open(tmp_path / "soak.out", "w+") as output:
        proc = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            for index, target in enumerate(kill_steps):
                while _saved(log) < target:
                    assert proc.poll() is None, "the job ended before every fault was injected"
                    assert time.monotonic() - started < 10 * plain_seconds + 600, "the soak run stalled"
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.2))  # into the steps after that save
                workers = psutil.Process(proc.pid).children()
                while len(workers) < 2:  # torchrun is between attempts: wait for both ranks
                    time.sleep(0.01)
                    workers = psutil.Process(proc.pid).children()
                victim = rng.choice(workers)
                victim.send_signal(signal.SIGKILL)
                kills.append({"after_save": _saved(log), "rank_pid": victim.pid})
                if index == corrupt_at:
                    psutil.wait_procs(workers, timeout=60)  # torchrun stops the other rank too
                    newest = (root / (root / "latest").read_text().strip()).resolve()
                    corrupted = {"checkpoint": newest.name, "file": _flip_a_byte(newest).name}
            proc.wait(timeout=10 * plain_seconds + 600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        output.seek(0)
        text = output.read()
    assert proc.returncode == 0, text[-4000:]

    attempts = [e for e in _entries(log) if "attempt" in e]
    # Each rank warns with the same message (the damaged file's name): count distinct ones.
    caught = len({line for line in text.splitlines() if "Loading the checkpoint before it" in line})
    figures = {
        "seed": seed,
        "steps": STEPS,
        "checkpoint_every": SAVE_EVERY,
        "kills": len(kills),
        "restarts": len(attempts) - 1,
        "corruptions_injected": int(corrupted is not None),
        "corruptions_caught": caught,
        "resumed_from": [e["resumed_from"] for e in attempts],
        "kills_after_save": [k["after_save"] for k in kills],
        "corrupted": corrupted,
        "seconds": round(time.monotonic() - started, 1),
        "uninterrupted_seconds": round(plain_seconds, 1),
    }
    print("soak:", json.dumps(figures))
    assert len(attempts) == KILLS + 1 and caught >= 1, figures
    # Each restart resumed from the last save before its kill, except the one after the damaged
    # checkpoint, which fell back to the save before that (the work of one checkpoint interval redone).
    assert_identical(torch.load(out, weights_only=True), plain.final())
