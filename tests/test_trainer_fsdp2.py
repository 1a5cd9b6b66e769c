"""``SasshaTrainer`` under FSDP2 through accelerate's FSDP plugin (``fsdp_version 2``), on 2 gloo ranks.

What is emulated, and why. accelerate 1.15 on CPU silently ignores the FSDP
plugin: ``AcceleratorState.__init__`` switches ``distributed_type`` to ``FSDP``
only from the accelerator multi-process types (``MULTI_GPU``, ``MULTI_NPU``,
...), never from ``MULTI_CPU``. Each rank here wraps ``AcceleratorState.__init__``
so that, after the stock initialisation has produced ``MULTI_CPU`` over the gloo
group, it does exactly what that branch does for a GPU: ``distributed_type =
FSDP``, the mixed-precision setting passed to the plugin (none here) and
``fsdp_plugin = <the Trainer's plugin>``. Nothing else is patched:
the Trainer sees ``is_fsdp_enabled`` and FSDP2, creates the optimizer before
``prepare``, accelerate's ``_prepare_fsdp2`` runs ``fsdp2_prepare_model``
(``fully_shard`` per ``GPT2Block`` and the root, on a CPU mesh) and swaps the
optimizer's parameters for DTensors, micro-batches run under its ``no_sync``
(``set_requires_gradient_sync(False)``), clipping goes through its
DTensor-aware ``clip_grad_norm_``, and checkpoints through
``save_fsdp_model`` / ``save_fsdp_optimizer`` (DCP, ``SHARDED_STATE_DICT``)
and their loaders. Not covered: NCCL, GPU memory, mixed precision.

The FSDP settings are those of ``launch/accelerate/fsdp2.yaml``: each rank gets
the environment that ``accelerate launch --config_file launch/accelerate/fsdp2.yaml``
would give it, computed by accelerate's own launcher code
(``tests/accelerate_env.py``), and the Trainer builds its FSDP plugin from it.

The FSDP2 run uses SASSHA's defaults for the engine (``hessian_method`` and
``probe_mode`` "auto", which must resolve to finite differences with global
probes once the parameters are DTensors); the reference is one process without
FSDP, told ``hessian_method=finite_difference,probe_mode=global``, fed the same
8 blocks per step (4 per micro-batch there, 2 per rank and micro-batch here).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from sassha_dist import state_keys as keys
from sassha_dist.integrations.embedded import BlockDataset, tiny_gpt2
from sassha_dist.integrations.transformers import SasshaTrainer, SasshaTrainingArguments, TrainerSassha
from tests.accelerate_env import fsdp_env
from tests.distributed import run_ranks
from tests.helpers import trainer_arguments

BLOCK, STEPS, SAVE_AT, ACCUM, WORLD = 16, 4, 2, 2, 2
OPTIM_ARGS = "rho=0.05,lazy_hessian=2"
FSDP_CONFIG = {
    "version": 2,
    "transformer_layer_cls_to_wrap": ["GPT2Block"],
    "reshard_after_forward": True,
    "state_dict_type": "SHARDED_STATE_DICT",
}


def _blocks() -> torch.Tensor:
    return torch.randint(0, 256, (48, BLOCK), generator=torch.Generator().manual_seed(0))


def _eval_data() -> BlockDataset:
    return BlockDataset(_blocks()[:8])


def _args(output_dir: Path, batch: int, **overrides) -> SasshaTrainingArguments:
    settings = {
        "optim_args": OPTIM_ARGS,
        "learning_rate": 0.05,
        "weight_decay": 0.1,
        "warmup_steps": 1,
        "max_steps": STEPS,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": ACCUM,
        "max_grad_norm": 1.0,  # below the perturbed gradient's norm: clipping is active
    }
    return trainer_arguments(output_dir, **{**settings, **overrides})


def _take_fsdp_path_on_cpu() -> None:
    """The one emulation (see the module docstring): MULTI_CPU with an FSDP plugin becomes FSDP."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    stock_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        stock_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def _summary(trainer: SasshaTrainer) -> dict:
    from torch.distributed.fsdp import FSDPModule

    optimizer = trainer.optimizer.optimizer
    plugin = trainer.accelerator.state.fsdp_plugin
    return {
        "params": {n: p.full_tensor().detach().clone() for n, p in trainer.model.named_parameters()},
        "counters": dict(optimizer.counters),
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "engine": (
            trainer.is_fsdp_enabled,
            trainer.accelerator.is_fsdp2,
            str(plugin.state_dict_type),
            type(trainer.model).__name__,
            type(optimizer.strategy).__name__,
            optimizer.hessian_method,
            optimizer.probe_mode,
        ),
        "units": sorted({type(m).__name__ for m in trainer.model.modules() if isinstance(m, FSDPModule)}),
    }


def _fsdp2_rank(rank: int, world: int, root: str, config_env: dict[str, str]) -> dict:
    """Under launch/accelerate/fsdp2.yaml's settings: an uninterrupted run (saving at SAVE_AT), then a
    fresh trainer resumed from that checkpoint, then the start-up checks."""
    _take_fsdp_path_on_cpu()
    root_dir, data = Path(root), BlockDataset(_blocks())
    settings = {"save_strategy": "steps", "save_steps": SAVE_AT}
    os.environ.update(config_env)  # what `accelerate launch --config_file fsdp2.yaml` gives each process
    try:
        model = tiny_gpt2(seed=0, n_positions=BLOCK).double()
        args = _args(root_dir / "full", 2, **settings)
        trainer = SasshaTrainer(model=model, args=args, train_dataset=data, eval_dataset=_eval_data())
        untrained = trainer.evaluate()  # before train(), as run_clm.py does
        trainer.train()
        full = {**_summary(trainer), "untrained_eval_loss": untrained["eval_loss"]}
        del trainer, model
        gc.collect()

        model = tiny_gpt2(seed=1, n_positions=BLOCK).double()  # other weights: the checkpoint sets them
        args = _args(root_dir / "resumed", 2, **settings)
        trainer = SasshaTrainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=str(root_dir / "full" / f"checkpoint-{SAVE_AT}"))
        resumed = _summary(trainer)
        del trainer, model
        gc.collect()
    finally:
        for key in config_env:
            del os.environ[key]
    return {"full": full, "resumed": resumed, "start_up": _start_up_checks(root_dir, config_env)}


def _start_up_checks(root_dir: Path, config_env: dict[str, str]) -> dict:
    """What SasshaTrainer accepts and refuses once FSDP is really enabled (no training)."""
    outcomes = {}

    def outcome(name, args, env=None):
        os.environ.update(env or {})
        try:
            model = tiny_gpt2(seed=0, n_positions=BLOCK).double()
            trainer = SasshaTrainer(model=model, args=args, train_dataset=BlockDataset(_blocks()))
        except (ValueError, NotImplementedError) as error:
            outcomes[name] = (type(error).__name__, str(error))
        else:
            plugin = trainer.accelerator.state.fsdp_plugin
            outcomes[name] = ("ok", trainer.is_fsdp_enabled, plugin.fsdp_version)
            del trainer
        finally:
            for key in env or {}:
                del os.environ[key]
        gc.collect()

    fsdp = {"fsdp": True, "fsdp_config": FSDP_CONFIG}
    outcome("trainer_args", _args(root_dir / "x", 2, **fsdp))
    outcome("exact", _args(root_dir / "x", 2, optim_args="hessian_method=exact", **fsdp))
    outcome("bf16", _args(root_dir / "x", 2, bf16=True, **fsdp))
    outcome("bf16_fd_step", _args(root_dir / "x", 2, bf16=True, optim_args="fd_step=2.5e-2", **fsdp))
    # FSDP1's plugin asks for a GPU when sync_module_states is on (fsdp2.yaml's default): off here.
    fsdp1 = {**config_env, "FSDP_VERSION": "1", "FSDP_SYNC_MODULE_STATES": "false"}
    outcome("accelerate_config_v1", _args(root_dir / "x", 2), fsdp1)
    return outcomes


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("fsdp2")
    config_env = fsdp_env("launch/accelerate/fsdp2.yaml")
    return run_ranks(_fsdp2_rank, WORLD, str(root), config_env, timeout=150), root


def _reference(tmp_path: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_gpt2(seed=0, n_positions=BLOCK).double()
        args = _args(
            tmp_path, 2 * WORLD, optim_args=f"{OPTIM_ARGS},hessian_method=finite_difference,probe_mode=global"
        )
        trainer = SasshaTrainer(
            model=model, args=args, train_dataset=BlockDataset(_blocks()), eval_dataset=_eval_data()
        )
        untrained = trainer.evaluate()
        trainer.train()
        optimizer = trainer.optimizer.optimizer
        return {
            "untrained_eval_loss": untrained["eval_loss"],
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "counters": dict(optimizer.counters),
            "logs": [h for h in trainer.state.log_history if "loss" in h],
        }
    finally:
        torch.set_num_threads(threads)


def test_fsdp2_trainer_matches_one_process(fsdp2_runs, tmp_path):
    """Tolerances. float64 model; the runs differ only in summation order (per-rank halves of each
    micro-batch, reduce-scattered and averaged, against one process's sums), ~1e-16 relative
    per operation, which the finite difference (gradient differences divided by 2h, h ~ 1e-3
    * ||w|| / ||z||) and the preconditioner 1/(sqrt(D) + eps) (where a one-probe D is tiny)
    amplify. Observed after 4 steps (2 Hessian refreshes): weights within 6e-12 absolute, the
    perturbed gradient's norm within 1e-13 relative. Weights: rtol=1e-9, atol=1e-10 (16x
    margin); grad_norm: rtol=1e-9. A lost micro-batch, a pass without the reduce-scatter,
    per-rank instead of global probes or an unclipped gradient moves weights by >= 1e-4.
    The logged loss goes through the Trainer's float32 accumulator (``_tr_loss``): observed
    8.6e-8 relative (one float32 ulp at 5.5), so rtol=1e-6 (~10 ulps)."""
    results, _ = fsdp2_runs
    reference = _reference(tmp_path)
    for rank in results:
        run = rank["full"]
        assert run["engine"] == (
            True, True, "StateDictType.SHARDED_STATE_DICT", "FSDPGPT2LMHeadModel",
            "FullyShard", "finite_difference", "global",
        )  # fmt: skip
        assert "FSDPGPT2Block" in run["units"]  # fsdp2.yaml's TRANSFORMER_BASED_WRAP: one unit per block
        # Evaluating before train() works under FSDP2 (SasshaTrainer prepares model and optimizer
        # together first) and leaves the training below unchanged. The eval loss is reported in
        # float32 like the training loss (observed equal): the same rtol.
        assert run["untrained_eval_loss"] == pytest.approx(reference["untrained_eval_loss"], rel=1e-6)
        assert (
            run["counters"]
            == reference["counters"]
            == {
                keys.GLOBAL_STEP: STEPS,
                keys.HESSIAN_REFRESHES: STEPS // 2,
                keys.SKIPPED_STEPS: 0,
            }
        )
        assert run["params"].keys() == reference["params"].keys()
        for name, value in reference["params"].items():
            torch.testing.assert_close(run["params"][name], value, rtol=1e-9, atol=1e-10, msg=name)
        assert [h["step"] for h in run["logs"]] == list(range(1, STEPS + 1))
        torch.testing.assert_close(
            torch.tensor([h["loss"] for h in run["logs"]]),
            torch.tensor([h["loss"] for h in reference["logs"]]),
            rtol=1e-6,
            atol=0.0,
        )
        # The Trainer clipped the perturbed (DTensor) gradient: its pre-clip norm exceeds the limit.
        assert any(h["grad_norm"] > 1.0 for h in run["logs"])
        torch.testing.assert_close(
            torch.tensor([h["grad_norm"] for h in run["logs"]]),
            torch.tensor([h["grad_norm"] for h in reference["logs"]]),
            rtol=1e-9,
            atol=0.0,
        )
    for name in reference["params"]:  # every rank gathers the same full weights
        assert torch.equal(results[0]["full"]["params"][name], results[1]["full"]["params"][name]), name


def test_fsdp2_resume_from_checkpoint_continues_exactly(fsdp2_runs):
    """Resuming at SAVE_AT from accelerate's sharded (DCP) checkpoint reproduces the uninterrupted
    run bit for bit: the same operations on the same shards, in the same order."""
    import torch.distributed.checkpoint as dist_cp

    results, root = fsdp2_runs
    checkpoint = root / "full" / f"checkpoint-{SAVE_AT}"
    # The optimizer-wide counters are in the DCP checkpoint (repeated in the param groups, since
    # get_optimizer_state_dict keeps only "state" and "param_groups").
    metadata = dist_cp.FileSystemReader(str(checkpoint / "optimizer_0")).read_metadata()
    saved = [k for k in metadata.state_dict_metadata if keys.COUNTERS in k]
    assert any(k.endswith(keys.HESSIAN_REFRESHES) for k in saved), sorted(metadata.state_dict_metadata)[:20]
    for rank in results:
        full, resumed = rank["full"], rank["resumed"]
        assert resumed["engine"] == full["engine"]
        assert resumed["counters"] == full["counters"]
        # Logs 1..SAVE_AT come back with the Trainer's state; the later ones are computed again.
        assert [h["step"] for h in resumed["logs"]] == list(range(1, STEPS + 1))
        assert [h["loss"] for h in resumed["logs"]] == [h["loss"] for h in full["logs"]]
        for name, value in full["params"].items():
            assert torch.equal(resumed["params"][name], value), name


def test_fsdp2_start_up_checks(fsdp2_runs):
    """Under a real FSDP plugin: FSDP2 from the Trainer's arguments is accepted (from an accelerate
    config it trains in the tests above); FSDP1 from an accelerate config, exact Hessians, and bf16
    without a bf16 finite-difference step are refused at start-up with errors that name the fix."""
    results, _ = fsdp2_runs
    for rank in results:
        outcomes = rank["start_up"]
        assert outcomes["trainer_args"] == ("ok", True, 2)
        kind, message = outcomes["accelerate_config_v1"]
        assert kind == "NotImplementedError" and "FSDP2 only" in message and "fsdp2.yaml" in message
        kind, message = outcomes["exact"]
        assert kind == "ValueError" and "hessian_method=exact" in message and "finite_difference" in message
        # bf16 needs the bf16 finite-difference step (fp32's drowns in rounding); given, it starts.
        kind, message = outcomes["bf16"]
        assert kind == "ValueError" and "fd_step=2.5e-2" in message
        assert outcomes["bf16_fd_step"] == ("ok", True, 2)


# -- torch.distributed.checkpoint.state_dict, the API accelerate's FSDP checkpoints use -------


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def test_torch_state_dict_api_keeps_counters_and_initialises_empty_state():
    """get/set_optimizer_state_dict keep only "state" and "param_groups", and initialise an empty
    optimizer by setting zero gradients and lr=0 and calling step() without a closure. The
    counters must survive (a skipped step makes them differ from what per-parameter state
    implies), the initialisation must not move a weight, and the loaded optimizer must continue
    exactly."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kwargs = {"lr": 0.1, "lazy_hessian": 2, "hessian_method": "finite_difference"}
    model = _tiny()
    optimizer = TrainerSassha(model.parameters(), **kwargs)
    for step in range(4):
        scale = float("nan") if step == 1 else 1.0
        optimizer.step(lambda s=scale: nn.functional.mse_loss(model(x), y) * s)
    assert optimizer.counters[keys.SKIPPED_STEPS] == 1

    saved = get_optimizer_state_dict(model, optimizer)
    assert keys.COUNTERS not in saved  # torch drops it; the param groups carry a copy
    assert all(g[keys.COUNTERS] == optimizer.counters for g in saved["param_groups"])

    twin = _tiny()
    twin.load_state_dict(model.state_dict())
    loaded = TrainerSassha(twin.parameters(), **kwargs)
    with pytest.raises(RuntimeError, match="none is in progress"):
        loaded.step()  # an ordinary closure-less step outside the Trainer is still refused
    before = [p.detach().clone() for p in twin.parameters()]
    set_optimizer_state_dict(twin, loaded, saved)  # empty state: initialised through step()
    assert all(torch.equal(a, b) for a, b in zip(before, twin.parameters(), strict=True))
    assert loaded.counters == optimizer.counters
    assert all(keys.COUNTERS not in g for g in loaded.param_groups)
    assert [g["lr"] for g in loaded.param_groups] == [0.1]
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key in (keys.MOMENTUM, keys.HESSIAN_DIAG, keys.STEP, keys.HESSIAN_UPDATES):
            assert torch.equal(optimizer.state[p][key], loaded.state[q][key]), key
    for _ in range(2):
        optimizer.step(lambda: nn.functional.mse_loss(model(x), y))
        loaded.step(lambda: nn.functional.mse_loss(twin(x), y))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
