"""The launch scripts: torchrun runs a small model end to end (2 CPU processes), the loss falls, and a
signal to torchrun stops the job with a checkpoint that a relaunch resumes exactly; the accelerate
configs, the Slurm scripts and the GPU check are checked without starting processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import free_port
from tests.helpers import printed, run_signalled

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


def _train_py(out: Path, *args: str, **signal_kw):
    """torchrun (2 gloo ranks) of launch/torchrun/train.py, handling SIGUSR1 as Slurm jobs do."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        str(ROOT / "launch/torchrun/train.py"), *args,
    ]  # fmt: skip
    return run_signalled(command, out, {**os.environ, "OMP_NUM_THREADS": "1"}, **signal_kw)


def _assert_equal(a, b, where="export"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize(("engine", "sig"), [("ddp", signal.SIGTERM), ("fsdp2", signal.SIGUSR1)])
def test_train_py_preempted_saves_and_a_relaunch_resumes_exactly(tmp_path, engine, sig):
    """Slurm's path: torchrun gets the signal (SIGUSR1 with ``--signal`` and ``--signals-to-handle``),
    forwards it to both workers, which finish their step, save it and exit 75. The relaunch resumes
    from that step and exports exactly (``torch.equal``: same W, same data per step, a bit-identical
    restored state) the model, ``m``, ``D`` and counters of an uninterrupted run."""
    common = ["--engine", engine, "--steps", "120", "--save-every", "1000"]
    common += ["--preempt-signals", "SIGTERM,SIGUSR1"]
    rc, plain = _train_py(tmp_path / "plain.out", *common, "--export", str(tmp_path / "plain.pt"))
    assert rc == 0, plain[-3000:]
    job = [*common, "--ckpt-dir", str(tmp_path / "ckpt"), "--export", str(tmp_path / "resumed.pt")]
    rc, first = _train_py(tmp_path / "job.out", *job, signal_when=printed("step   20"), sig=sig)
    stopped = re.search(r"preempted after step (\d+), saved to .*; exit 75", first)
    assert rc != 0 and stopped, first[-3000:]  # torchrun exits with an error when it is signalled
    assert not (tmp_path / "resumed.pt").exists()
    rc, second = _train_py(tmp_path / "job.out", *job)
    assert rc == 0, second[-3000:]
    assert f"at step {stopped.group(1)}" in second
    _assert_equal(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "plain.pt"))


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


def _stand_ins(bin_dir: Path, stand_ins: dict[str, str]) -> None:
    bin_dir.mkdir()
    for name, body in stand_ins.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
        (bin_dir / name).chmod(0o755)


def test_accelerate_sbatch_runs_one_accelerate_launch_per_node(tmp_path):
    """`bash -n`, then the script under stand-ins for srun, scontrol and accelerate: each node's
    task must run accelerate launch with its own machine rank and the job-wide values."""
    script = ROOT / "launch/slurm/accelerate.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    header = script.read_text().split("\n#SBATCH")[0]
    assert "sbatch launch/slurm/accelerate.sbatch " in header
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    stand_ins = {
        # srun: drop its options, run the task once per node with that node's SLURM_NODEID.
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
        'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@"; done\n',
        "scontrol": "printf 'gpu-a\\ngpu-b\\n'\n",
        "accelerate": '(IFS="|"; echo "$*") >> "$CALLS"\n',  # "|" between arguments: quoting shows
    }
    _stand_ins(bin_dir, stand_ins)
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


def _requeueing_script(name: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """launch/slurm/``name`` after ``bash -n`` and a check of its signal/requeue headers, with the
    paths its stand-ins log to (calls) and record the task's pid in."""
    script = ROOT / "launch/slurm" / name
    subprocess.run(["bash", "-n", str(script)], check=True)
    header = script.read_text()
    assert "#SBATCH --signal=B:USR1@" in header and "#SBATCH --requeue" in header
    return script, tmp_path / "calls.log", tmp_path / "task.pid"


@pytest.mark.parametrize("event", ["time limit", "preempted"])
def test_accelerate_sbatch_passes_signals_on_and_requeues_at_the_time_limit(tmp_path, event):
    """launch/slurm/accelerate.sbatch with stand-ins (an ``accelerate`` that runs until SIGTERM, then
    exits 75 as run_clm.py does after saving). Time limit: SIGUSR1 to the script (``--signal=B:USR1``)
    must become ``scancel --signal=TERM`` for every task, then ``scontrol requeue`` once the task
    exits. Slurm's own preemption (SIGTERM to every process): the script must outlive the signal,
    wait for the task and exit with its status, leaving the requeue to Slurm (``--requeue``)."""
    script, calls, pid_file = _requeueing_script("accelerate.sbatch", tmp_path)
    _stand_ins(
        tmp_path / "bin",
        {
            "srun": 'while [[ "$1" == --* ]]; do shift; done\n"$@"\n',
            "accelerate": 'echo "accelerate $1" >> "$CALLS"\necho $$ > "$PID_FILE"\n'
            'trap \'echo "task: SIGTERM, saved" >> "$CALLS"; exit 75\' TERM\n'
            "while true; do sleep 0.05; done\n",
            "scancel": 'echo "scancel $*" >> "$CALLS"\nkill -TERM "$(cat "$PID_FILE")"\n',
            "scontrol": '[[ "$1" == show ]] && echo gpu-a || echo "scontrol $*" >> "$CALLS"\n',
        },
    )
    env = {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "PID_FILE": str(pid_file),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "gpu-a",
        "SLURM_GPUS_PER_NODE": "2",
    }
    proc = subprocess.Popen(["bash", str(script), "--output_dir", "out"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pid_file.exists(), "the task never started"
        if event == "time limit":
            proc.send_signal(signal.SIGUSR1)
        else:
            proc.send_signal(signal.SIGTERM)
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = calls.read_text().splitlines()
    if event == "time limit":
        expected = ["accelerate launch", "scancel --signal=TERM 4242", "task: SIGTERM, saved"]
        assert (rc, lines) == (0, [*expected, "scontrol requeue 4242"])
    else:
        assert (rc, lines) == (75, ["accelerate launch", "task: SIGTERM, saved"])


def test_sassha_sbatch_requeues_on_its_time_limit_signal_and_resumes_exactly(tmp_path):
    """launch/slurm/sassha.sbatch on one node with the real torchrun and train.py (2 gloo ranks) and
    stand-ins for srun, scancel and scontrol. SIGUSR1 to the script (what ``--signal=B:USR1@180``
    sends) must reach the workers through ``scancel --signal=USR1``, the workers must save the step
    they finish, and the script must requeue the job; the requeued job must resume from that step
    and export exactly what an uninterrupted run does."""
    script, calls, pid_file = _requeueing_script("sassha.sbatch", tmp_path)
    _stand_ins(
        tmp_path / "bin",
        {
            # srun: drop its options, run the task (torchrun) in the background and wait for it.
            "srun": 'while [[ "$1" == --* ]]; do shift; done\n"$@" &\necho $! > "$PID_FILE"\nwait $!\n',
            "scancel": 'echo "scancel $*" >> "$CALLS"\nkill -USR1 "$(cat "$PID_FILE")"\n',
            "scontrol": '[[ "$1" == show ]] && echo localhost || echo "scontrol $*" >> "$CALLS"\n',
        },
    )
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "CALLS": str(calls),
        "PID_FILE": str(pid_file),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "CKPT_DIR": str(tmp_path / "ckpt"),
    }
    train = ["--engine", "ddp", "--steps", "120", "--save-every", "1000"]
    rc, plain = _train_py(tmp_path / "plain.out", *train, "--export", str(tmp_path / "plain.pt"))
    assert rc == 0, plain[-3000:]

    job = ["bash", str(script), *train, "--export", str(tmp_path / "resumed.pt")]
    rc, first = run_signalled(
        job, tmp_path / "job.out", env, signal_when=printed("step   20"), sig=signal.SIGUSR1
    )
    stopped = re.search(r"preempted after step (\d+), saved to", first)
    assert rc == 0 and stopped, first[-3000:]
    assert calls.read_text().splitlines() == ["scancel --signal=USR1 4242", "scontrol requeue 4242"]
    assert not (tmp_path / "resumed.pt").exists()

    env["MASTER_PORT"] = str(free_port())
    rc, second = run_signalled(job, tmp_path / "job.out", env)  # the requeued job
    assert rc == 0, second[-3000:]
    assert f"at step {stopped.group(1)}" in second
    assert calls.read_text().splitlines() == ["scancel --signal=USR1 4242", "scontrol requeue 4242"]
    _assert_equal(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "plain.pt"))


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
