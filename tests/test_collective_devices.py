"""Every tensor SASSHA hands to a collective lives on the device the group communicates on.

NCCL refuses CPU tensors that gloo accepts, so a tensor built without a device
(``torch.tensor(count)``) passes every CPU test and fails on the first GPU run. On CPU the
parameters' device and a hard-coded CPU are the same device, so comparing devices alone
proves nothing here. The audit therefore also follows where each tensor came from:

* :class:`HardCodedDevices` (a ``TorchFunctionMode``) marks every tensor made by a factory
  (``torch.tensor``, ``zeros``, ``full``, ...) without a ``device`` or with the literal ``"cpu"``,
  and carries the mark through operations whose inputs are all marked (an operation with one
  unmarked input runs on that input's device, as a CUDA op takes 0-dim CPU scalars;
  ``stack``/``cat`` with any marked input are marked: they fail on mixed devices). Moving a
  tensor with ``.to(<device object>)`` (``.to(p.device)``, ``communication_device(...)``) clears it.
* :class:`CollectiveAudit` (a ``TorchDispatchMode``) sees every ``c10d`` collective, SASSHA's and
  the engines' (DDP's reducer, FSDP's all-gathers, DTensor redistributes, DeepSpeed), and
  records each tensor's device, dtype and mark, with the first calling frame outside torch and
  DeepSpeed.

A run passes when every collective tensor is on the parameters' device with a dtype NCCL
reduces, and no collective takes a marked tensor that ``sassha_dist`` (or this file) made.
Tensors torch makes inside its own collectives (the checkpoints' object collectives) are on the
device torch picks for the group, the current GPU under NCCL.

``test_audit_catches_a_hard_coded_device`` shows the audit flags the pattern the ZeRO
strategy had (an element count made with ``torch.tensor(float(n), dtype=float64)``) and accepts
the fixed one; patched back into the ZeRO run, the old count is flagged there too (checked by
hand when this test was written). The runs are 2 gloo ranks, tiny models, 3 steps (a Hessian
refresh on step 1 with ``lazy_hessian=3``).
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sassha_dist import Sassha
from tests import sharded
from tests.distributed import run_ranks

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
# Dtypes torch's NCCL process group reduces (bool travels as uint8).
NCCL_DTYPES = {
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.bool,
}
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_SASSHA_DIR = str(REPO / "sassha_dist")
_THIS_FILE = str(Path(__file__).resolve())
_OVERRIDES_FILE = str(Path(torch.overrides.__file__).resolve())
_CONSTRUCTORS = _device_constructors()
_CONCATENATIONS = {torch.stack, torch.cat, torch.concat, torch.concatenate}
_DEVICE_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}


class HardCodedDevices(TorchFunctionMode):
    """Marks tensors whose device was never taken from an existing tensor (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._marked: dict[int, tuple[weakref.ref, str]] = {}

    def made_at(self, tensor: torch.Tensor) -> str | None:
        """Where a marked tensor was made (the first frame outside torch), ``None`` if unmarked."""
        entry = self._marked.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _mark(self, out: Any, site: str) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._marked[id(t)] = (weakref.ref(t), site)

    def _unmark(self, out: Any) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and self.made_at(t) is not None:
                del self._marked[id(t)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in _CONSTRUCTORS and not (args and isinstance(args[0], torch.Tensor)):
            device = kwargs.get("device")
            if device is None or device == "cpu":
                self._mark(out, direct_caller())
            return out
        if func in _DEVICE_MOVES:
            targets = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
            targets += [a for a in args[1:] if isinstance(a, torch.Tensor)]  # .to(other)
            if func is torch.Tensor.cpu or any(t == "cpu" for t in targets if isinstance(t, str)):
                self._mark(out, direct_caller())
                return out
            if targets or func is torch.Tensor.cuda:
                self._unmark(out)
                return out
        if not inputs:
            return out
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.startswith("__")) or name.startswith("__i"):
            return out  # in place: the result is the tensor written into, as it was
        made_at = [self.made_at(t) for t in inputs]
        sites = [site for site in made_at if site is not None]
        if len(sites) == len(inputs) or (func in _CONCATENATIONS and sites):
            self._mark(out, sites[0])  # the mark keeps where the device-less tensor was made
        return out


@dataclass
class CollectiveCall:
    op: str
    device: str
    dtype: str
    made_at: str | None  # where the tensor was made without a device (marked), else None
    site: str  # where the collective was issued: first frame outside torch and DeepSpeed, "file:line"


_AUDIT_FRAMES = {"__torch_function__", "__torch_dispatch__", "calling_site", "direct_caller"}


def direct_caller() -> str:
    """The frame that called the torch function being intercepted, as ``file:line`` (may be torch's own)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = str(Path(frame.f_code.co_filename).resolve())
        in_audit = filename == _THIS_FILE and frame.f_code.co_name in _AUDIT_FRAMES
        if not (in_audit or filename == _OVERRIDES_FILE):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def calling_site() -> str:
    """The innermost frame outside torch, DeepSpeed and this audit's own methods, as ``file:line``."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = str(Path(frame.f_code.co_filename).resolve())
        in_audit = filename == _THIS_FILE and frame.f_code.co_name in _AUDIT_FRAMES
        if not (in_audit or filename.startswith(_TORCH_DIR) or f"{os.sep}deepspeed{os.sep}" in filename):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class CollectiveAudit(TorchDispatchMode):
    """Records the tensors of every ``c10d`` / ``_c10d_functional`` op while active."""

    def __init__(self, marks: HardCodedDevices) -> None:
        super().__init__()
        self.marks = marks
        self.calls: list[CollectiveCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional"):
            site = calling_site()
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    made_at = self.marks.made_at(t)
                    self.calls.append(
                        CollectiveCall(func.__name__, str(t.device), str(t.dtype), made_at, site)
                    )
        return func(*args, **kwargs)


class audited:
    """``with audited() as audit:`` both modes, the function mode outermost."""

    def __enter__(self) -> CollectiveAudit:
        self.marks = HardCodedDevices()
        self.audit = CollectiveAudit(self.marks)
        self.marks.__enter__()
        self.audit.__enter__()
        return self.audit

    def __exit__(self, *exc: Any) -> None:
        self.audit.__exit__(*exc)
        self.marks.__exit__(*exc)


def _ours(site: str | None) -> bool:
    return site is not None and (site.startswith(_SASSHA_DIR) or site.startswith(_THIS_FILE))


def problems(calls: list[CollectiveCall], device: torch.device) -> list[str]:
    """What NCCL would refuse: a tensor off the parameters' device, a dtype it does not reduce,
    or a tensor SASSHA made without taking its device from a parameter. Tensors torch makes
    itself (the object collectives of checkpoints) are torch's choice: the group's device."""
    found = []
    for call in calls:
        if call.device != str(device):
            found.append(f"{call.op} on {call.device}, parameters on {device} ({call.site})")
        if call.dtype not in {str(d) for d in NCCL_DTYPES}:
            found.append(f"{call.op} of {call.dtype}, which NCCL does not reduce ({call.site})")
        if _ours(call.made_at):
            found.append(f"{call.op} on a tensor made without the parameters' device at {call.made_at}")
    return found


# ------------------------------------------------------------------------------------ the runs


def _train(model: nn.Module, optimizer: Sassha, rank: int, world: int) -> None:
    every = sharded.batches(world * STEPS)
    for step in range(STEPS):
        x, y = every[step * world + rank]
        optimizer.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))


def _ddp(**options) -> None:
    ddp = nn.parallel.DistributedDataParallel(sharded.model())
    optimizer = Sassha(ddp.parameters(), **{**sharded.KW, "probe_mode": "per_rank", **options})
    _train(ddp, optimizer, dist.get_rank(), dist.get_world_size())


def _fsdp2(**options) -> None:
    from sassha_dist.distributed import FullyShard

    model = sharded.fully_sharded(sharded.model(), dist.get_world_size())
    params = list(model.parameters())
    optimizer = Sassha(params, strategy=FullyShard(params, module=model), **{**sharded.KW, **options})
    _train(model, optimizer, dist.get_rank(), dist.get_world_size())


def _fsdp2_checkpoint(directory: str) -> None:
    """A DCP save and load (the checkpoint's own broadcasts and barriers)."""
    from sassha_dist import checkpoint

    model = sharded.fully_sharded(sharded.model(), dist.get_world_size())
    optimizer = Sassha(model.parameters(), **sharded.KW)
    _train(model, optimizer, dist.get_rank(), dist.get_world_size())
    checkpoint.save(directory, model, optimizer)
    checkpoint.load(directory, model, optimizer)


def _fsdp1() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sassha_dist.distributed import FlatShard

    wrapped = FullyShardedDataParallel(sharded.model(), device_id=torch.device("cpu"), use_orig_params=True)
    optimizer = Sassha(wrapped.parameters(), strategy=FlatShard(wrapped), **sharded.KW)
    _train(wrapped, optimizer, dist.get_rank(), dist.get_world_size())


def _zero(stage: int) -> None:
    from sassha_dist.distributed.deepspeed import initialize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update(sub_group_size=16, stage3_param_persistence_threshold=0)
    config = {
        "train_micro_batch_size_per_gpu": 12,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
    }
    # Built inside the audit: binding the driver counts the model's elements in a collective.
    engine, driver = initialize(model, config, **{**sharded.KW, "fd_step": 1e-2})
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(12, 5, generator=g), torch.randn(12, 1, generator=g)
        driver.step(lambda x=x, y=y: nn.functional.mse_loss(engine(x), y))


def _audit_cases(rank: int, world: int, cases: list[tuple[str, dict]]) -> dict[str, list[CollectiveCall]]:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if any(name.startswith("zero") for name, _ in cases):
        import deepspeed

        os.environ["LOCAL_RANK"] = str(rank)
        deepspeed.init_distributed(dist_backend="gloo")
    runs = {
        "ddp_exact": lambda: _ddp(hessian_method="exact"),
        "ddp_one_pass_exact": lambda: _ddp(hessian_method="exact", rho=0.0),
        "ddp_fd": lambda: _ddp(hessian_method="finite_difference"),
        "fsdp2_fd": lambda: _fsdp2(),
        "fsdp2_exact": lambda: _fsdp2(hessian_method="exact", probe_mode="per_rank"),
        "fsdp2_checkpoint": _fsdp2_checkpoint,
        "fsdp1_fd": _fsdp1,
        "zero2": lambda: _zero(2),
        "zero3": lambda: _zero(3),
    }
    out = {}
    for name, kwargs in cases:
        with audited() as audit:
            runs[name](**kwargs)
        out[name] = audit.calls
    return out


def _assert_clean(per_rank: list[dict[str, list[CollectiveCall]]]) -> None:
    for rank, cases in enumerate(per_rank):
        for name, calls in cases.items():
            ours = [c for c in calls if _ours(c.site)]
            # Not vacuous: the audit saw SASSHA's own collectives (skip flags at least, every step).
            assert len(ours) >= STEPS, f"rank {rank} {name}: only {len(ours)} of SASSHA's collectives seen"
            found = problems(calls, torch.device("cpu"))
            assert not found, (rank, name, found)


@pytest.mark.usefixtures("one_thread")
def test_collective_tensors_on_the_parameters_device(tmp_path):
    cases = [
        ("ddp_exact", {}),
        ("ddp_one_pass_exact", {}),
        ("ddp_fd", {}),
        ("fsdp2_fd", {}),
        ("fsdp2_exact", {}),
        ("fsdp2_checkpoint", {"directory": str(tmp_path / "dcp")}),
        ("fsdp1_fd", {}),
    ]
    _assert_clean(run_ranks(_audit_cases, 2, cases, timeout=240))


@pytest.mark.usefixtures("one_thread")
def test_collective_tensors_on_the_parameters_device_zero():
    pytest.importorskip("deepspeed")
    from tests.golden.runs import deepspeed_environment

    deepspeed_environment()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()  # compiled (or loaded) once here, so the ranks only load it
    _assert_clean(run_ranks(_audit_cases, 2, [("zero2", {}), ("zero3", {})], timeout=300))


# ------------------------------------------------------------------------- the audit itself


def _audit_self_check(rank: int, world: int) -> dict[str, list[str]]:
    from sassha_dist.distributed.devices import communication_device

    param = nn.Linear(2, 2).weight
    found = {}
    with audited() as audit:
        # The ZeRO driver's element count before the fix: a CPU float64 tensor, refused by NCCL.
        dist.all_reduce(torch.tensor(float(param.numel()), dtype=torch.float64))
    found["no_device"] = problems(audit.calls, param.device)
    with audited() as audit:
        dist.all_reduce(torch.zeros(1).cpu())
    found["hard_coded_cpu"] = problems(audit.calls, param.device)
    with audited() as audit:
        dist.all_reduce(torch.stack([param.detach().sum(), torch.tensor(1.0)]))
    found["stacked_with_a_host_scalar"] = problems(audit.calls, param.device)
    with audited() as audit:
        count = torch.full((), param.numel(), dtype=torch.int64, device=communication_device([param]))
        dist.all_reduce(count)
        dist.all_reduce(param.detach().square().sum() * torch.tensor(2.0))  # a CPU scalar operand
        dist.all_reduce(torch.tensor([True, False]).to(param.device))
    found["fixed"] = problems(audit.calls, param.device)
    found["fixed_calls"] = [c.op for c in audit.calls]
    return found


def test_audit_catches_a_hard_coded_device():
    for found in run_ranks(_audit_self_check, 2, timeout=60):
        assert found["no_device"] and "made without the parameters' device" in found["no_device"][0]
        assert found["hard_coded_cpu"]
        assert found["stacked_with_a_host_scalar"]
        assert found["fixed"] == [], found["fixed"]
        assert len(found["fixed_calls"]) == 3
