"""The golden runs: short, fully deterministic trajectories of every engine, written once for the
recorder (``python -m tests.golden.record``) and the test (``tests/test_golden.py``).

A case returns its *payload*:

* ``losses``: the loss each step returned, stacked (the loss's dtype; the Trainer's logged losses
  as float64);
* ``params``: the final full parameters, by name;
* ``state``: ``momentum`` (m) and ``hessian_diag`` (D) per parameter, by name: the rank's local
  shard under FSDP2 and FSDP1, and per flat partition (``partition<i>``) under ZeRO;
* ``counters``: ``optimizer.counters``;
* ``rng`` (dropout cases): the CPU generator's state after the run.

A multi-rank case holds one payload per rank: ``{"rank0": ..., "rank1": ...}``.

Cases run in *launches*: ``single`` and ``trainer`` in this process, ``ranks`` (DDP, FSDP2,
FSDP1) and ``zero`` (DeepSpeed ZeRO 1/2/3) each in one :func:`tests.distributed.run_ranks` launch
of 2 gloo ranks, all cases of the launch in order (process start and imports dominate a launch).
Every case seeds what it draws, and every launch runs with one intra-op thread.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sassha_dist import Sassha
from sassha_dist import state_keys as keys
from sassha_dist.schedules import PiecewiseConstant
from tests import sharded
from tests.helpers import make_batches, make_mlp

GOLDEN_DIR = Path(__file__).resolve().parent
REPO = GOLDEN_DIR.parents[1]
STEPS = 8
WORLD = 2
FORMAT = 1

# Single device: refreshes at steps 1, 4 and 7.
SINGLE_KW = {"lr": 0.05, "rho": 0.05, "lazy_hessian": 3, "n_samples": 2, "weight_decay": 0.01}
MLP = (4, 8, 8, 1)
EXACT = {"hessian_method": "exact"}
FD = {"hessian_method": "finite_difference"}
RHO_SCHEDULE = PiecewiseConstant((0.0, 0.05), (3,))  # 0 on steps 1-3: one-pass steps
# ZeRO: tests/test_deepspeed.py's settings (fp32 needs the larger finite-difference step).
ZERO_KW = {**sharded.KW, "fd_step": 1e-2}


@dataclass(frozen=True)
class Case:
    name: str
    launch: str  # "single", "trainer", "ranks" or "zero"
    run: Callable[..., dict]  # single/trainer: run() ; ranks/zero: run(rank, world)


LAUNCHES = ("single", "trainer", "ranks", "zero")
#: The module each launch's engine needs (a launch without it is skipped by the test).
ENGINE_MODULE = {"trainer": "transformers", "zero": "deepspeed"}
CASES: dict[str, Case] = {}


def _add(name: str, launch: str, run: Callable[..., dict]) -> None:
    assert name not in CASES, name
    CASES[name] = Case(name, launch, run)


# ------------------------------------------------------------------------------------ payloads


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _state(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor]) -> dict[str, dict]:
    out = {}
    for name, p in named.items():
        state = optimizer.state.get(p, {})  # .get: do not create an entry in the defaultdict
        out[name] = {k: _local(state[k]) for k in (keys.MOMENTUM, keys.HESSIAN_DIAG) if k in state}
    return out


def _payload(losses, params: dict[str, torch.Tensor], state: dict, counters: dict) -> dict:
    if not torch.is_tensor(losses):
        losses = torch.stack([torch.as_tensor(loss).detach().clone() for loss in losses])
    return {
        "losses": losses,
        "params": {n: p.detach().clone() for n, p in params.items()},
        "state": state,
        "counters": dict(counters),
    }


def _closures(model: nn.Module, batches: list, micro: int, step: int) -> list[Callable[[], torch.Tensor]]:
    """``micro`` closures of step ``step`` (0-based), each returning its share of the mean loss."""
    window = batches[step * micro : (step + 1) * micro]
    return [lambda b=b: nn.functional.mse_loss(model(b[0]), b[1]) / micro for b in window]


# ------------------------------------------------------------------------------- single device


def _dropout_mlp() -> nn.Module:
    """``make_mlp(MLP)`` with dropout 0.2 after both hidden layers."""
    base = make_mlp(MLP)
    return nn.Sequential(base[0], base[1], nn.Dropout(0.2), base[2], base[3], nn.Dropout(0.2), base[4])


def _single(
    make_optimizer: Callable[..., Sassha], *, dtype=torch.float64, micro: int = 1, dropout: bool = False
) -> dict:
    torch.manual_seed(100)  # dropout masks (the only draws from the global generator)
    model = _dropout_mlp() if dropout else make_mlp(MLP, dtype=dtype)
    model.train()
    batches = make_batches(STEPS * micro, in_dim=MLP[0], dtype=dtype)
    optimizer = make_optimizer(model.parameters())
    losses = []
    for step in range(STEPS):
        closures = _closures(model, batches, micro, step)
        losses.append(optimizer.step(closures if micro > 1 else closures[0]))
    named = dict(model.named_parameters())
    payload = _payload(losses, named, _state(optimizer, named), optimizer.counters)
    if dropout:
        payload["rng"] = torch.get_rng_state()
    return payload


def _sassha(**options) -> Callable[..., Sassha]:
    return lambda params: Sassha(params, **{**SINGLE_KW, **options})


for _name, _run in {
    "single_exact": functools.partial(_single, _sassha(**EXACT)),
    "single_exact_no_foreach": functools.partial(_single, _sassha(**EXACT, foreach=False)),
    "single_fd_central": functools.partial(_single, _sassha(**FD)),
    "single_fd_forward": functools.partial(_single, _sassha(**FD, fd_scheme="forward")),
    "single_accumulation_exact": functools.partial(_single, _sassha(**EXACT), micro=2),
    "single_accumulation_fd": functools.partial(_single, _sassha(**FD), micro=2),
    "single_rho_schedule_exact": functools.partial(_single, _sassha(**EXACT, rho=RHO_SCHEDULE)),
    "single_rho_schedule_fd": functools.partial(_single, _sassha(**FD, rho=RHO_SCHEDULE)),
    # The authors' recipes, with k = 3 so that 8 steps refresh the Hessian 3 times. The GPT-2
    # recipe's lr 0.3 sends this MLP's loss to 1e10 in 4 steps (D is not bias-corrected and its
    # power is 1 in the warm-up): lr 0.005 keeps it training.
    "authors_image": functools.partial(_single, lambda params: Sassha.authors(params, lazy_hessian=3)),
    "authors_lm": functools.partial(
        _single,
        lambda params: Sassha.authors(
            params, "lm", rho_warmup_iters=2, hessian_warmup_iters=3, lazy_hessian=3, lr=0.005
        ),
    ),
    "single_dropout_fd": functools.partial(_single, _sassha(**FD), dropout=True),
    "single_dropout_exact": functools.partial(_single, _sassha(**EXACT), dropout=True),
    "single_dropout_accumulation_fd": functools.partial(_single, _sassha(**FD), dropout=True, micro=2),
    "single_bf16_exact": functools.partial(_single, _sassha(**EXACT), dtype=torch.bfloat16),
    # eps 1e-2: the documented bf16 finite-difference setting (no underflow warning)
    "single_bf16_fd": functools.partial(_single, _sassha(**FD, eps=1e-2), dtype=torch.bfloat16),
}.items():
    _add(_name, "single", _run)


# -------------------------------------------------------------------------------------- Trainer

TRAINER_BLOCK, TRAINER_BATCH, TRAINER_VOCAB = 8, 2, 32


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def _trainer_model() -> nn.Module:
    """A 1-layer GPT-2 of ~1.3k parameters in float64 (eager attention: exact Hessians)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=TRAINER_VOCAB,
        n_positions=TRAINER_BLOCK,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).double()
    model.loss_type = "ForCausalLM"  # as sassha_dist.integrations.embedded.tiny_gpt2
    return model


def _trainer(accumulation: int, max_grad_norm: float) -> dict:
    from transformers import PrinterCallback

    from sassha_dist.integrations.transformers import SasshaTrainer
    from tests.helpers import trainer_arguments

    model = _trainer_model()
    count = TRAINER_BATCH * accumulation * STEPS
    blocks = torch.randint(
        0, TRAINER_VOCAB, (count, TRAINER_BLOCK), generator=torch.Generator().manual_seed(0)
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = trainer_arguments(
            tmp,
            optim_args="rho=0.05,lazy_hessian=3",
            learning_rate=0.05,
            weight_decay=0.1,
            warmup_steps=1,
            max_steps=STEPS,
            per_device_train_batch_size=TRAINER_BATCH,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=max_grad_norm,
        )
        trainer = SasshaTrainer(model=model, args=args, train_dataset=_Blocks(blocks))
        trainer.remove_callback(PrinterCallback)  # the logs are in log_history
        trainer.train()
    optimizer = trainer.optimizer.optimizer
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    named = dict(model.named_parameters())
    return _payload(
        torch.tensor(losses, dtype=torch.float64), named, _state(optimizer, named), optimizer.counters
    )


_add("trainer", "trainer", functools.partial(_trainer, 1, 1.0))
# max_grad_norm 0.05 clips the perturbed gradient on every step
_add("trainer_accumulation", "trainer", functools.partial(_trainer, 2, 0.05))


# ---------------------------------------------------------------------------- DDP, FSDP2, FSDP1


def _rank_batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batch of each step (tests/sharded.py's float64 batches, a new one per step)."""
    every = sharded.batches(world * STEPS)
    return [every[step * world + rank] for step in range(STEPS)]


def _train_ranks(model: nn.Module, optimizer: Sassha, rank: int, world: int) -> list[torch.Tensor]:
    batches = _rank_batches(rank, world)
    return [optimizer.step(_closures(model, batches, 1, step)[0]) for step in range(STEPS)]


def _ddp(rank: int, world: int, **options) -> dict:
    model = sharded.model()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = Sassha(
        ddp.parameters(), **{**sharded.KW, "hessian_method": "exact", "probe_mode": "per_rank", **options}
    )
    losses = _train_ranks(ddp, optimizer, rank, world)
    named = dict(model.named_parameters())
    return _payload(losses, named, _state(optimizer, named), optimizer.counters)


def _fsdp2(rank: int, world: int) -> dict:
    model = sharded.fully_sharded(sharded.model(), world)
    optimizer = Sassha(model.parameters(), **sharded.KW)
    losses = _train_ranks(model, optimizer, rank, world)
    named = dict(model.named_parameters())
    full = {n: p.full_tensor() for n, p in named.items()}
    return _payload(losses, full, _state(optimizer, named), optimizer.counters)


def _fsdp1(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sassha_dist.distributed import FlatShard

    wrapped = FullyShardedDataParallel(sharded.model(), device_id=torch.device("cpu"), use_orig_params=True)
    optimizer = Sassha(wrapped.parameters(), strategy=FlatShard(wrapped), **sharded.KW)
    losses = _train_ranks(wrapped, optimizer, rank, world)
    named = dict(wrapped.named_parameters())
    state = _state(optimizer, named)
    with FullyShardedDataParallel.summon_full_params(wrapped):
        full = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    return _payload(losses, full, state, optimizer.counters)


_add("ddp_exact_per_rank", "ranks", _ddp)
_add("ddp_local_perturbation", "ranks", functools.partial(_ddp, local_perturbation=True))
_add("fsdp2_fd_global", "ranks", _fsdp2)
_add("fsdp1_flat_shard", "ranks", _fsdp1)


# ------------------------------------------------------------------------------------------ ZeRO


def _zero_config(stage: int) -> dict:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:  # several sub-groups, every parameter partitioned (as tests/test_deepspeed.py)
        zero.update(sub_group_size=16, stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": 12,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
    }


def _zero(rank: int, world: int, stage: int) -> dict:
    import deepspeed

    from sassha_dist.distributed.deepspeed import initialize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))
    engine, driver = initialize(model, _zero_config(stage), **ZERO_KW)
    g = torch.Generator().manual_seed(1)
    every = [(torch.randn(12, 5, generator=g), torch.randn(12, 1, generator=g)) for _ in range(world * STEPS)]
    batches = [every[step * world + rank] for step in range(STEPS)]
    losses = [driver.step(_closures(engine, batches, 1, step)[0]) for step in range(STEPS)]
    inner = engine.optimizer.optimizer  # the ZeroSassha on the flat fp32 partitions
    state = {
        f"partition{i}": {k: _local(s[k]) for k in (keys.MOMENTUM, keys.HESSIAN_DIAG) if k in s}
        for i, s in enumerate(inner.state.values())
    }
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        full = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return _payload(losses, full, state, inner.counters)


for _stage in (1, 2, 3):
    _add(f"zero{_stage}_fp32", "zero", functools.partial(_zero, stage=_stage))


# -------------------------------------------------------------------------------------- launches


def deepspeed_environment() -> None:
    """DeepSpeed on the CPU, its one JIT op compiled once per checkout (as tests/test_deepspeed.py)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


def available(launch: str) -> bool:
    module = ENGINE_MODULE.get(launch)
    return module is None or importlib.util.find_spec(module) is not None


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rank_launch(rank: int, world: int, launch: str, names: list[str]) -> dict[str, dict]:
    # torch's deprecation of all_gather_into_tensor/reduce_scatter_tensor, once per DeepSpeed call
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if launch == "zero":
        import deepspeed

        os.environ["LOCAL_RANK"] = str(rank)
        deepspeed.init_distributed(dist_backend="gloo")
    return {name: CASES[name].run(rank, world) for name in names}


def run_launch(launch: str) -> dict[str, dict]:
    """Every case of ``launch``, in registration order: ``{case name: payload}``."""
    from tests.distributed import run_ranks

    names = [c.name for c in CASES.values() if c.launch == launch]
    if launch in ("single", "trainer"):
        with one_thread():
            return {name: CASES[name].run() for name in names}
    if launch == "zero":
        deepspeed_environment()
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()  # compile (or load) here, so that the ranks only load it
    per_rank = run_ranks(_rank_launch, WORLD, launch, names, timeout=300)
    return {name: {f"rank{r}": out[name] for r, out in enumerate(per_rank)} for name in names}


# ------------------------------------------------------------------------------ files, comparison


def path_of(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.pt"


def environment() -> dict[str, str]:
    """What the bits may depend on besides the code: recorded with each golden, named on a mismatch."""
    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for module in ("transformers", "accelerate", "deepspeed"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[module] = importlib.metadata.version(module)
    versions["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return versions


def save(name: str, payload: dict) -> Path:
    path = path_of(name)
    torch.save({"format": FORMAT, "case": name, "environment": environment(), "payload": payload}, path)
    return path


def load(name: str) -> dict:
    return torch.load(path_of(name), weights_only=True)


def first_difference(expected: Any, actual: Any, where: str = "") -> str | None:
    """``None`` if ``actual`` equals ``expected`` bit for bit, else where and how they first differ."""
    if torch.is_tensor(expected):
        if not torch.is_tensor(actual):
            return f"{where}: expected a tensor, got {type(actual).__name__}"
        if (expected.dtype, expected.shape) != (actual.dtype, actual.shape):
            shapes = f"{expected.dtype}{list(expected.shape)}, got {actual.dtype}{list(actual.shape)}"
            return f"{where}: expected {shapes}"
        if torch.equal(expected, actual):
            return None
        e, a = expected.reshape(-1), actual.reshape(-1)
        unequal = (e != a).nonzero().reshape(-1)
        i = int(unequal[0])
        gap = (e.double() - a.double()).abs().max().item() if e.is_floating_point() else "n/a"
        return (
            f"{where}: {unequal.numel()} of {e.numel()} elements differ; first at flat index {i}: "
            f"expected {e[i].item()!r}, got {a[i].item()!r} (max |difference| {gap})"
        )
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or list(expected) != list(actual):
            got = list(actual) if isinstance(actual, dict) else type(actual).__name__
            return f"{where}: expected keys {list(expected)}, got {got}"
        for key in expected:
            found = first_difference(expected[key], actual[key], f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(expected, (list, tuple)):
        if type(actual) is not type(expected) or len(actual) != len(expected):
            return f"{where}: expected {expected!r}, got {actual!r}"
        for i, (x, y) in enumerate(zip(expected, actual, strict=True)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    if type(expected) is not type(actual) or expected != actual:
        return f"{where}: expected {expected!r}, got {actual!r}"
    return None
