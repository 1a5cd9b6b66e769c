"""The torchrun launch scripts run a small model end to end (2 CPU processes) and the loss falls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "engine"),
    [("ddp.sh", "ddp"), ("fsdp2.sh", "fsdp2"), (None, "fsdp1")],
)
def test_torchrun_script_trains(script, engine):
    env = {
        **os.environ,
        "NPROC": "2",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    if script is None:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "launch/torchrun/train.py"),
            "--engine",
            engine,
            "--steps",
            "21",
        ]
    else:
        command = ["bash", str(ROOT / "launch/torchrun" / script), "--steps", "21"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"engine={engine} world=2" in result.stdout
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0]
