"""The torchrun launch scripts run a small model end to end (2 CPU processes) and the loss falls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# -- accelerate configs and the Slurm script (no processes started) ---------------------------

ACCELERATE_CONFIGS = sorted((ROOT / "launch/accelerate").glob("*.yaml"))


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_says_how_to_use_it(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.compute_environment.value == "LOCAL_MACHINE"
    header = config.read_text().split("\ncompute_environment:")[0]
    assert header.startswith("# ") and all(line.startswith("#") for line in header.splitlines()), header
    assert f"accelerate launch --config_file launch/accelerate/{config.name} " in header


@pytest.mark.parametrize(
    ("config", "distributed_type", "machines", "processes"),
    [
        ("multi_gpu.yaml", "MULTI_GPU", 1, 8),
        ("fsdp2.yaml", "FSDP", 1, 8),
        ("multinode.yaml", "MULTI_GPU", 2, 16),
    ],
)
def test_gpu_configs(config, distributed_type, machines, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(ROOT / "launch/accelerate" / config))
    assert (loaded.distributed_type.value, loaded.num_machines, loaded.num_processes) == (
        distributed_type,
        machines,
        processes,
    )
    assert not loaded.use_cpu and loaded.mixed_precision == "no"
    if machines > 1:
        assert loaded.main_process_ip and loaded.machine_rank == 0


def test_fsdp2_config_reaches_the_processes_as_fsdp2_with_sharded_checkpoints(monkeypatch):
    """What `accelerate launch --config_file launch/accelerate/fsdp2.yaml` hands each process, and the
    FSDP plugin accelerate builds from it (the Trainer run under it is tests/test_trainer_fsdp2.py)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from tests.accelerate_env import fsdp_env

    env = fsdp_env("launch/accelerate/fsdp2.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert (env["FSDP_VERSION"], env["FSDP_RESHARD_AFTER_FORWARD"]) == ("2", "true")
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.reshard_after_forward) == (2, True)
    assert str(plugin.state_dict_type) == "StateDictType.SHARDED_STATE_DICT"
    assert plugin.auto_wrap_policy is not None


def test_accelerate_sbatch_runs_one_accelerate_launch_per_node(tmp_path):
    """`bash -n`, then the script under stand-ins for srun, scontrol and accelerate: each node's
    task must run accelerate launch with its own machine rank and the job-wide values."""
    script = ROOT / "launch/slurm/accelerate.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    header = script.read_text().split("\n#SBATCH")[0]
    assert "sbatch launch/slurm/accelerate.sbatch " in header
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stand_ins = {
        # srun: drop its options, run the task once per node with that node's SLURM_NODEID.
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
        'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@"; done\n',
        "scontrol": "printf 'gpu-a\\ngpu-b\\n'\n",
        "accelerate": '(IFS="|"; echo "$*") >> "$CALLS"\n',  # "|" between arguments: quoting shows
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(log),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_GPUS_PER_NODE": "h100:4",
    }
    result = subprocess.run(
        ["bash", str(script), "--output_dir", "out dir", "--max_steps", "5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert call.split("|") == [
            "launch", "--config_file", "launch/accelerate/multinode.yaml", "--num_machines", "2",
            "--num_processes", "8", "--machine_rank", str(rank), "--main_process_ip", "gpu-a",
            "--main_process_port", "29500", "integrations/run_clm.py", "--optim", "sassha",
            "--output_dir", "out dir", "--max_steps", "5",
        ]  # fmt: skip


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "launch/gpu/check.sh"), *args], capture_output=True, text=True, timeout=60
    )


def test_gpu_check_dry_run_lists_every_stage_within_its_budget(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "deepspeed-0-py3-none-any.whl").touch()
    result = _check("--out", str(tmp_path / "out"), "--wheels", str(wheels), "--dry-run")
    assert result.returncode == 0, result.stderr
    stages = re.findall(r"^  (\S+)\s+(\d+)s  (.*)$", result.stdout, flags=re.M)
    assert [s[0] for s in stages] == [
        "install", "pytest", "engines", "step-time", "kernel", "memory-comm", "main-job"
    ]  # fmt: skip
    assert sum(int(s[1]) for s in stages) < 8 * 60  # a rerun fits a 15-minute lease
    commands = dict((s[0], s[2]) for s in stages)
    assert "--no-index" in commands["install"] and "torch" not in commands["install"]
    assert "-m cuda" in commands["pytest"] and "--device cuda" in commands["step-time"]
    assert "multi_gpu.yaml --num_processes 1" in commands["main-job"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_gpu_check_refuses_bad_input_before_running_anything(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_wheels = _check("--out", str(tmp_path / "out"), "--wheels", str(empty))
    assert no_wheels.returncode == 2 and "build_wheels.sh" in no_wheels.stderr
    no_out = _check()
    assert no_out.returncode == 2 and "--out" in no_out.stderr
    if not torch.cuda.is_available():
        no_gpu = _check("--out", str(tmp_path / "out"))
        assert no_gpu.returncode == 3 and "--allow-cpu" in no_gpu.stderr
    assert not (tmp_path / "out").exists()
