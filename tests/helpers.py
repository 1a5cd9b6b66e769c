"""Tiny models, data and comparison helpers shared by the optimizer tests."""

from __future__ import annotations

import copy
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sassha_dist import state_keys as keys

ROOT_DIR = Path(__file__).resolve().parents[1]


def make_mlp(sizes=(3, 5, 1), dtype=torch.float64, seed: int = 0) -> nn.Module:
    """``Linear -> Tanh -> ... -> Linear`` with weights drawn from a private generator (no global RNG)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(fan_in, fan_out))
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    return model.to(dtype)


def make_batches(
    n: int, in_dim: int = 3, out_dim: int = 1, batch: int = 8, dtype=torch.float64, seed: int = 1
):
    """``n`` fixed regression batches ``(x, y)``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, in_dim, generator=gen).to(dtype),
            torch.randn(batch, out_dim, generator=gen).to(dtype),
        )
        for _ in range(n)
    ]


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def closure_for(model: nn.Module, batch):
    return lambda: mse(model, batch)


def reference_loss_fn(model: nn.Module):
    """``loss_fn(params_list, batch)`` for ``ReferenceSassha``, evaluated on a private copy of ``model``."""
    template = copy.deepcopy(model)
    names = [name for name, _ in template.named_parameters()]

    def loss_fn(params, batch):
        x, y = batch
        out = functional_call(template, dict(zip(names, params, strict=True)), (x,))
        return ((out - y) ** 2).mean()

    return loss_fn


def reference_params(model: nn.Module) -> list[torch.Tensor]:
    """Leaf clones of the model's parameters, in ``model.parameters()`` order."""
    return [p.detach().clone().requires_grad_() for p in model.parameters()]


def snapshot(model_or_params, optimizer=None):
    """Clones of the parameters and, with ``optimizer``, of every state entry and the counters."""
    params = list(model_or_params.parameters()) if isinstance(model_or_params, nn.Module) else model_or_params
    shot = {"params": [p.detach().clone() for p in params]}
    if optimizer is not None:
        shot["state"] = [
            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
            if p in optimizer.state
            else None
            for p in params
        ]
        shot["counters"] = dict(optimizer.counters)
    return shot


def assert_same(a: dict, b: dict) -> None:
    """Bit-for-bit equality of two snapshots (``torch.equal`` on every tensor)."""
    assert len(a["params"]) == len(b["params"])
    for i, (x, y) in enumerate(zip(a["params"], b["params"], strict=True)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"parameter {i} differs"
    if "state" in a or "state" in b:
        for i, (sa, sb) in enumerate(zip(a["state"], b["state"], strict=True)):
            assert (sa is None) == (sb is None), f"state of parameter {i}: {sa} vs {sb}"
            if sa is None:
                continue
            assert set(sa) == set(sb)
            for k in sa:
                # torch.equal ignores dtype: compare it for m and D (0-dim counters: values only)
                if sa[k].dim():
                    assert sa[k].dtype == sb[k].dtype, (
                        f"state[{k}] of param {i}: {sa[k].dtype} vs {sb[k].dtype}"
                    )
                assert torch.equal(sa[k], sb[k]), f"state[{k}] of parameter {i} differs"
        assert a["counters"] == b["counters"]


STATE_TENSOR_KEYS = (keys.MOMENTUM, keys.HESSIAN_DIAG)


def trainer_arguments(output_dir, **settings):
    """``SasshaTrainingArguments`` for the Trainer tests: ``optim="sassha"``, batches in order, a
    linear schedule, a log every step, no saves, the CPU, no progress bar, seed 0. ``settings``
    gives the rest (optim_args, learning rate, batch sizes, ...) and may override any of these."""
    from sassha_dist.integrations.transformers import SasshaTrainingArguments  # imports transformers

    defaults = {
        "output_dir": str(output_dir),
        "optim": "sassha",
        "lr_scheduler_type": "linear",
        "train_sampling_strategy": "sequential",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    return SasshaTrainingArguments(**{**defaults, **settings})


def printed(line: str) -> Callable[[str], bool]:
    """A :func:`run_signalled` trigger: ``line`` appears in the output."""
    return lambda output: line in output


def run_signalled(
    command: list[str],
    out: Path,
    env: dict[str, str],
    signal_when: Callable[[str], bool] | None = None,
    sig: signal.Signals = signal.SIGTERM,
    delay: float = 0.0,
    timeout: float = 180.0,
) -> tuple[int, str]:
    """Run ``command`` (output appended to ``out``); once ``signal_when(its output so far)`` holds, wait
    ``delay`` seconds and send it ``sig`` (its first process only, as a scheduler would). Returns
    (returncode, this run's output). Past ``timeout`` its whole process group is killed and the test
    fails. Output goes to a file, not a pipe: a stuck worker (in its own session) cannot block the read."""
    with open(out, "a+") as output:
        start = output.tell()
        proc = subprocess.Popen(
            command, cwd=ROOT_DIR, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        try:
            while signal_when is not None and proc.poll() is None:
                output.seek(start)
                if signal_when(output.read()):
                    time.sleep(delay)
                    if proc.poll() is None:
                        proc.send_signal(sig)
                    break
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(command, timeout)
                time.sleep(0.02)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            output.seek(start)
            pytest.fail(f"{command[:4]} did not finish within {timeout} s:\n{output.read()[-4000:]}")
        output.seek(start)
        return proc.returncode, output.read()
