"""Measured optimizer state, peak memory and collective bytes per rank, SASSHA vs AdamW: DDP, FSDP2, ZeRO.

All world sizes W (default 1, 2 and 4) are launched at once, W real ranks each
(gloo on CPU, nccl with ``--device cuda``): only bytes are measured, so ranks
may share cores. Every rank trains, for each engine, the contestants on the
same MLP and its own batch: AdamW (``torch.optim.AdamW``; under ZeRO the same
class as DeepSpeed's client optimizer), SASSHA at each ``--k`` (default 1
and 10) and M-SASSHA (``perturbation="momentum"``) at the largest k. SASSHA
uses central finite-difference Hessians with global probes under FSDP2 and
ZeRO (double backward fails there, ``SPEC.md`` §4) and its default exact
per-rank probes under DDP. One warm-up step creates the optimizer
state; then AdamW and SASSHA ``k = 1`` are measured over 2 steps, SASSHA
``k > 1`` over k steps (exactly one Hessian refresh), so per-step figures count
the Hessian step 1/k.

Per rank it measures:

* **optimizer state**: the bytes of the optimizer's state tensors on the rank
  (``to_local()`` under FSDP2; ZeRO's inner optimizer on its flat partition),
  scalar counters excluded;
* **peak memory**: on CPU, live tensor storage as :class:`Recorder` (a
  ``TorchDispatchMode`` active from before the model is built) sees it: every
  storage an op returns counted once until a weakref finalizer sees it die, on
  whichever thread, and FSDP2's ``UntypedStorage.resize_`` followed. "peak" is
  the highest live total during a step (model, gradients, state, engine and
  optimizer buffers); "above step start" subtracts what was live when the step
  began. On CUDA, ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``. Not seen: the communication libraries' own
  buffers and temporaries inside a collective or inside DTensor's dispatch.
  (The profiler's CPU memory timeline loses frees made on unprofiled threads,
  such as gloo's, so tensors they release would look leaked.)
* **collective traffic**: a ``TorchDispatchMode`` sees every ``c10d`` and
  ``_c10d_functional`` op (what ``torch.distributed``, FSDP2 and
  ``deepspeed.comm`` all end in) with its tensors. Each is counted once, with
  its full payload B (an all-gather's output, a reduce-scatter's input, an
  all-reduce's tensor) and the bytes each rank sends under ring algorithms
  (all-reduce 2(W-1)/W B; reduce-scatter, all-gather, reduce, broadcast
  (W-1)/W B). Payloads of at most 64 elements are "scalars"; all-gathers and
  broadcasts are parameter gathers; the rest are gradient reductions. The
  profiler's count of ``c10d::`` ops in the same steps cross-checks that the
  mode saw every one.

The table gives SASSHA's state against AdamW's and against W = 1, its peak
above AdamW's in shard-sized buffers (the rank's fp32 optimizer parameters),
and its gradient-reduction and all-gather payloads per step against AdamW's,
next to the target p + c/k (p = 2 passes for SASSHA, 1 for M-SASSHA; c:
gradient-sized reductions per Hessian refresh: 2 passes for central
differences, 1 estimate all-reduce under DDP) and the cost
model's prediction (:func:`sassha_dist.bench.cost_model.compare_measured`).
"""

from __future__ import annotations

import argparse
import gc
import io
import logging
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sassha_dist.bench.common import format_table, machine_description
from sassha_dist.bench.recorder import KINDS, Recorder, summarize_calls
from sassha_dist.options import PERTURB_GRADIENT, PERTURB_MOMENTUM

__all__ = ["ENGINES", "Recorder", "add_arguments", "measure", "run"]

ENGINES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
ENGINE_NAMES = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp2": "FSDP2"}


def contestants(ks: list[int]) -> list[tuple[str, int | None, int, str]]:
    """``(label, lazy_hessian or None for AdamW, measured steps, perturbation)``: AdamW, SASSHA at
    each k and M-SASSHA (``perturbation="momentum"``) at the largest, over 2 steps, or k steps for
    k > 1 (exactly one Hessian refresh, so it counts 1/k)."""
    largest = max(ks)
    return (
        [("AdamW", None, 2, PERTURB_GRADIENT)]
        + [(f"SASSHA k={k}", k, k if k > 1 else 2, PERTURB_GRADIENT) for k in ks]
        + [(f"M-SASSHA k={largest}", largest, largest if largest > 1 else 2, PERTURB_MOMENTUM)]
    )


def _average(steps: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(steps)
    avg: dict[str, Any] = {
        kind: {key: sum(s[kind][key] for s in steps) / n for key in ("count", "payload", "sent")}
        for kind in KINDS
    }
    ops = sorted({op for s in steps for op in s["by_op"]})
    avg["by_op"] = {
        op: {
            key: sum(s["by_op"].get(op, {}).get(key, 0.0) for s in steps) / n
            for key in ("count", "payload", "sent")
        }
        for op in ops
    }
    return avg


# -- memory -------------------------------------------------------------------------------


class _Steps:
    """Runs measured steps: per step the collectives, and the peak memory (since the model was built
    and above the step's start) from the :class:`Recorder` on CPU or CUDA's peak statistics."""

    def __init__(self, device: torch.device, recorder: Recorder) -> None:
        self.device = device
        self.recorder = recorder
        self.cuda_base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def run(self, fn: Callable[[], Any]) -> tuple[float, float]:
        gc.collect()  # no collection of earlier garbage inside the measured step
        gc.disable()
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                start = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                fn()
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                return float(peak - self.cuda_base), float(peak - start)
            start = self.recorder.reset_peak()
            fn()
            return float(self.recorder.peak), float(self.recorder.peak - start)
        finally:
            gc.enable()


def _profiled_collectives(profile: Any) -> int:
    """c10d ops the profiler recorded (outermost only: the Recorder re-dispatches each op it sees)."""
    count = 0
    stack = [(e, False) for e in profile.profiler.kineto_results.experimental_event_tree()]
    while stack:
        event, inside = stack.pop()
        is_comm = event.name.startswith("c10d::")
        if is_comm and not inside and not event.name.startswith("c10d::wait"):
            count += 1
        stack.extend((child, inside or is_comm) for child in event.children)
    return count


# -- the rank side ------------------------------------------------------------------------


def _model(width: int, depth: int) -> nn.Sequential:
    """An MLP ``width`` wide, ``depth`` hidden Linear layers: activations negligible next to parameters."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(width, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _batch(rank: int, width: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(rows, width, generator=g).to(device), torch.randn(rows, 1, generator=g).to(device)


def _ds_config(stage: int, rows: int, bucket: int) -> dict[str, Any]:
    """DeepSpeed's defaults except the bucket sizes: its 5e8-element reduce bucket is allocated every
    step at stages 1/2 (2 GB in fp32), which would swamp a small model; ``bucket`` is the model's size."""
    zero: dict[str, Any] = {
        "stage": stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter
    return {
        "train_micro_batch_size_per_gpu": rows,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
    }


SASSHA_KW = {"lr": 1e-3, "rho": 0.05, "weight_decay": 0.0}


def _build(
    engine: str,
    lazy: int | None,
    perturbation: str,
    model: nn.Module,
    cfg: dict[str, Any],
    device: torch.device,
):
    """Returns ``(step(x, y), inner optimizer whose state and parameters are this rank's)``."""
    loss_fn = nn.functional.mse_loss
    foreach = device.type == "cuda"
    if engine in ("zero1", "zero2", "zero3"):
        import deepspeed

        bucket = -(-sum(p.numel() for p in model.parameters()) // 512) * 512  # DeepSpeed wants aligned sizes
        config = _ds_config(int(engine[-1]), cfg["rows"], bucket)
        if lazy is None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)
            ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

            def adamw_step(x, y):
                loss = loss_fn(ds(x), y)
                ds.backward(loss)
                ds.step()

            return adamw_step, ds.optimizer.optimizer
        from sassha_dist.distributed.deepspeed import initialize

        kw = {**SASSHA_KW, "lazy_hessian": lazy, "hessian_method": "finite_difference", "foreach": foreach}
        kw["perturbation"] = perturbation
        ds, sassha = initialize(model, config, **kw)
        return (lambda x, y: sassha.step(lambda: loss_fn(ds(x), y))), sassha.optimizer
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        kw = {"hessian_method": "finite_difference"}
    elif engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        kw = {}  # the default under DDP: exact Hessians, per-rank probes
    else:
        raise ValueError(f"Invalid engine={engine!r}. Must be one of {ENGINES}.")
    if lazy is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)

        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()

        return step, optimizer
    from sassha_dist import Sassha

    optimizer = Sassha(
        model.parameters(), lazy_hessian=lazy, foreach=foreach, perturbation=perturbation, **SASSHA_KW, **kw
    )
    return (lambda x, y: optimizer.step(lambda: loss_fn(model(x), y))), optimizer


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int, list[str]]:
    """Bytes of state tensors (dim > 0), bytes of the optimizer's local parameters, and the state keys."""
    state = counters = 0
    keys: set[str] = set()
    for s in optimizer.state.values():
        for key, value in s.items():
            if torch.is_tensor(value):
                local = _local(value)
                if local.dim() > 0:
                    state += local.numel() * local.element_size()
                    keys.add(str(key))
                else:
                    counters += local.numel() * local.element_size()
    params = sum(
        _local(p).numel() * _local(p).element_size() for g in optimizer.param_groups for p in g["params"]
    )
    return state, params, sorted(keys)


def _contestant(
    rank: int, world: int, engine: str, label: str, lazy: int | None, steps: int, perturbation: str, cfg
) -> dict:
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(cfg["device"]) if cfg["device"] == "cpu" else torch.device("cuda", rank)
    x, y = _batch(rank, cfg["width"], cfg["rows"], device)
    gc.collect()
    recorder = Recorder(world, track_memory=device.type == "cpu")
    with recorder:
        model = _model(cfg["width"], cfg["depth"]).to(device)
        step, optimizer = _build(engine, lazy, perturbation, model, cfg, device)
        step(x, y)  # warm-up: creates the optimizer state (and SASSHA's first Hessian estimate)
        steps_ = _Steps(device, recorder)
        per_step, peaks = [], []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                recorder.calls, recorder.counting = [], True
                peaks.append(steps_.run(lambda: step(x, y)))
                recorder.counting = False
                refreshed = bool(getattr(getattr(optimizer, "last_report", None), "hessian_refreshed", False))
                per_step.append({"hessian": refreshed, **summarize_calls(recorder.calls, world)})
        dist.barrier()
    profiler_collectives = _profiled_collectives(prof)
    state, params, keys = _state_bytes(optimizer)
    counted = sum(sum(s[k]["count"] for k in KINDS) for s in per_step)
    hessian_peaks = [p[0] for p, s in zip(peaks, per_step, strict=True) if s["hessian"]]
    plain_peaks = [p[0] for p, s in zip(peaks, per_step, strict=True) if not s["hessian"]]
    return {
        "engine": engine,
        "contestant": label,
        "k": lazy,
        "perturbation": perturbation,
        "rank": rank,
        "world_size": world,
        "steps": steps,
        "hessian_steps": sum(s["hessian"] for s in per_step),
        "state_bytes": state,
        "state_keys": keys,
        "param_bytes": params,
        "peaks_per_step": [(s["hessian"], *p) for p, s in zip(peaks, per_step, strict=True)],
        "peak": max(p[0] for p in peaks),
        "peak_above_start": max(p[1] for p in peaks),
        "peak_hessian_step": max(hessian_peaks) if hessian_peaks else None,
        "peak_plain_step": max(plain_peaks) if plain_peaks else None,
        "traffic": _average(per_step),
        "collectives_counted": counted,
        "collectives_profiler": profiler_collectives,
    }


def _rank_work(rank: int, world: int, cfg: dict[str, Any]) -> list[dict]:
    results = []
    if any(e.startswith("zero") for e in cfg["engines"]):
        import deepspeed
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)  # "untested optimizer" for the client AdamW, once per engine
        os.environ["LOCAL_RANK"] = str(rank)
        deepspeed.init_distributed(dist_backend=cfg["backend"])
    import sassha_dist.distributed  # noqa: F401  (imported before the freeze below)

    gc.collect()
    gc.freeze()  # imports' objects out of the collector's way: a collection per measured step stays cheap
    for engine in cfg["engines"]:
        for label, lazy, steps, perturbation in contestants(cfg["ks"]):
            results.append(_contestant(rank, world, engine, label, lazy, steps, perturbation, cfg))
    return results


def _rank_main(rank: int, world: int, port: int, cfg: dict[str, Any], results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(cfg["threads"])
    warnings.filterwarnings("ignore", category=FutureWarning)  # FSDP2's and DeepSpeed's deprecated c10d calls
    if cfg["device"] == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(cfg["backend"], rank=rank, world_size=world)
    try:
        buffer = io.BytesIO()
        torch.save(_rank_work(rank, world, cfg), buffer)
        results.put((world, rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((world, rank, "error", traceback.format_exc()))
        raise
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_sizes: list[int], cfg: dict[str, Any], timeout: float) -> dict[int, list[list[dict]]]:
    """Run the measurements on W spawned ranks for every W at once (process start and imports
    dominate, and bytes do not depend on timing), bounded by ``timeout``; each rank's results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = []
    for world in world_sizes:
        port = _free_port()
        procs += [
            ctx.Process(target=_rank_main, args=(r, world, port, cfg, results), daemon=True)
            for r in range(world)
        ]
    for p in procs:
        p.start()
    outputs: dict[tuple[int, int], Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < len(procs):
            try:
                world, rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"memory-comm: a rank died (exit codes {dead})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"memory-comm: the ranks did not finish within {timeout:.0f} s"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(f"memory-comm: rank {rank} of {world} failed:\n{value}")
            outputs[(world, rank)] = torch.load(io.BytesIO(value), weights_only=False)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return {world: [outputs[(world, r)] for r in range(world)] for world in world_sizes}


# -- the parent side ----------------------------------------------------------------------


def target_passes(engine: str, k: int, perturbation: str = PERTURB_GRADIENT) -> float:
    """SASSHA's gradient-sized reductions per step over AdamW's: 2 + c/k, or 1 + c/k for M-SASSHA."""
    c = 1 if engine == "ddp" else 2  # DDP: one all-reduce of the exact estimates; else two FD passes
    return (1 if perturbation == PERTURB_MOMENTUM else 2) + c / k


def measure(
    engines: list[str],
    world_sizes: list[int],
    ks: list[int],
    *,
    width: int = 256,
    depth: int = 3,
    rows: int = 8,
    device: str = "cpu",
    timeout: float = 600.0,
    threads: int = 1,
    progress: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """One row per (engine, W, contestant): rank 0's figures plus the spread over ranks, and the ratios."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler start/stop lines from every rank
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        repo_ext = Path(__file__).resolve().parents[2] / ".torch_extensions"
        if repo_ext.is_dir():
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(repo_ext))
    cfg = {
        "engines": engines,
        "ks": ks,
        "width": width,
        "depth": depth,
        "rows": rows,
        "device": device,
        "backend": "nccl" if device == "cuda" else "gloo",
        "threads": threads,
    }
    raw: dict[tuple[str, int, str], list[dict]] = {}
    start = time.perf_counter()
    for world, per_rank in launch(world_sizes, cfg, timeout).items():
        for rank_results in per_rank:
            for r in rank_results:
                raw.setdefault((r["engine"], world, r["contestant"]), []).append(r)
    if progress is not None:
        progress(f"memory-comm: {sum(world_sizes)} ranks in {time.perf_counter() - start:.0f} s")
    rows_out = []
    for (engine, world, label), ranks in raw.items():
        ranks.sort(key=lambda r: r["rank"])
        adamw = raw[(engine, world, "AdamW")]
        one = raw.get((engine, 1, label))
        row = _row(engine, world, label, ranks, adamw, one)
        rows_out.append(row)
    order = {e: i for i, e in enumerate(engines)}
    rows_out.sort(key=lambda r: (order[r["engine"]], r["world_size"], r["k"] or 0, r["perturbation"]))
    return rows_out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _row(
    engine: str, world: int, label: str, ranks: list[dict], adamw: list[dict], one: list[dict] | None
) -> dict:
    """Per-rank maxima (the rank that limits memory) and rank 0's traffic, with ratios to AdamW and W=1."""
    state = max(r["state_bytes"] for r in ranks)
    adamw_state = max(r["state_bytes"] for r in adamw)
    shard = adamw_state / 2  # AdamW's m (or v): one fp32 copy of the rank's optimizer parameters
    peak = max(r["peak"] for r in ranks)
    adamw_peak = max(r["peak"] for r in adamw)
    peak_hessian = max((r["peak_hessian_step"] or 0.0) for r in ranks)
    peak_plain = max((r["peak_plain_step"] or 0.0) for r in ranks)
    traffic = ranks[0]["traffic"]
    adamw_traffic = adamw[0]["traffic"]
    k = ranks[0]["k"]

    def vs_adamw(kind: str) -> float:
        # nothing is sent at W = 1 (engines skip or shortcut collectives there): no ratio
        return (
            float("nan") if world == 1 else _ratio(traffic[kind]["payload"], adamw_traffic[kind]["payload"])
        )

    return {
        "engine": engine,
        "world_size": world,
        "contestant": label,
        "k": k,
        "perturbation": ranks[0]["perturbation"],
        "state_bytes": state,
        "state_bytes_per_rank": [r["state_bytes"] for r in ranks],
        "state_keys": ranks[0]["state_keys"],
        "shard_bytes": shard,
        "state_vs_adamw": _ratio(state, adamw_state),
        "state_vs_w1": _ratio(state, max(r["state_bytes"] for r in one)) if one else float("nan"),
        "peak_bytes": peak,
        "peak_bytes_per_rank": [r["peak"] for r in ranks],
        "peak_above_start": max(r["peak_above_start"] for r in ranks),
        "peak_hessian_step": peak_hessian,
        "peak_plain_step": peak_plain,
        "adamw_peak_bytes": adamw_peak,
        "extra_buffers": (peak - adamw_peak) / shard if shard else float("nan"),
        "extra_buffers_hessian_step": (peak_hessian - adamw_peak) / shard
        if shard and peak_hessian
        else float("nan"),
        "extra_buffers_plain_step": (peak_plain - adamw_peak) / shard
        if shard and peak_plain
        else float("nan"),
        "traffic": traffic,
        "grad_reduction_vs_adamw": vs_adamw("grad_reduction"),
        "param_gather_vs_adamw": vs_adamw("param_gather"),
        "target": target_passes(engine, k, ranks[0]["perturbation"]) if k else 1.0,
        "hessian_steps": ranks[0]["hessian_steps"],
        "steps": ranks[0]["steps"],
        "collectives_counted": [r["collectives_counted"] for r in ranks],
        "collectives_profiler": [r["collectives_profiler"] for r in ranks],
    }


def _signed(x: float) -> str:
    return "-" if x != x else f"{x:+.2f}"


def _kb(x: float) -> str:
    return f"{x / 1e3:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "engine",
        "W",
        "optimizer",
        "state KB",
        "x AdamW",
        "x W=1",
        "peak KB",
        "above step start",
        "+ shard buffers, Hessian step",
        "+ shard buffers, plain step",
        "grad-red. KB sent/step",
        "x AdamW (payload)",
        "target p+c/k",
        "param AG KB sent/step",
        "x AdamW (payload)",
        "scalars/step",
    ]
    body = []
    for r in rows:
        t = r["traffic"]
        adamw = r["contestant"] == "AdamW"
        body.append(
            [
                ENGINE_NAMES[r["engine"]],
                r["world_size"],
                r["contestant"],
                _kb(r["state_bytes"]),
                r["state_vs_adamw"],
                r["state_vs_w1"],
                _kb(r["peak_bytes"]),
                _kb(r["peak_above_start"]),
                "" if adamw else _signed(r["extra_buffers_hessian_step"]),
                "" if adamw else _signed(r["extra_buffers_plain_step"]),
                _kb(t["grad_reduction"]["sent"]),
                "" if adamw else r["grad_reduction_vs_adamw"],
                "" if adamw else f"{r['target']:g}",
                _kb(t["param_gather"]["sent"]),
                "" if adamw else r["param_gather_vs_adamw"],
                f"{t['scalar']['count']:g}",
            ]
        )
    return format_table(headers, body)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 10], help="SASSHA lazy_hessian values")
    parser.add_argument("--width", type=int, default=256, help="MLP width (parameters ~ depth x width^2)")
    parser.add_argument("--depth", type=int, default=3, help="hidden Linear layers of the MLP")
    parser.add_argument("--rows", type=int, default=8, help="batch rows per rank")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for all ranks to finish")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run for tests: width 32, W = 1 and 2, k = 1 and 2"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sassha_dist.bench.cost_model import compare_measured

    if args.quick:
        args.width, args.world_sizes, args.k = 32, [1, 2], [1, 2]
    device = torch.device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < max(args.world_sizes):
        raise SystemExit(
            f"--device cuda: {max(args.world_sizes)} GPUs needed, {torch.cuda.device_count()} found."
        )
    if any(k < 1 for k in args.k) or any(w < 1 for w in args.world_sizes):
        raise SystemExit("--k and --world-sizes: every value must be >= 1.")
    rows = measure(
        args.engines,
        args.world_sizes,
        args.k,
        width=args.width,
        depth=args.depth,
        rows=args.rows,
        device=args.device,
        timeout=args.timeout,
        threads=args.threads or 1,
    )
    n_params = sum(p.numel() for p in _model(args.width, args.depth).parameters())
    comparison = compare_measured(rows, n_params)
    print(
        f"memory-comm: per rank per step; MLP {args.depth} x {args.width} ({n_params:,} fp32 parameters), "
        f"batch {args.rows} per rank; {machine_description(device)}, ranks {args.threads or 1} thread(s) each"
    )
    print()
    print(table(rows))
    print()
    print(
        "state: the largest rank's; 'extra shard buffers': (SASSHA's peak - AdamW's) / the rank's fp32 "
        "optimizer-parameter bytes; traffic: rank 0, bytes sent under ring algorithms, ratios of payloads; "
        "target p + c/k: p = 2 passes (SASSHA), 1 (M-SASSHA); "
        "c = 2 finite-difference passes per refresh (FSDP2, ZeRO), 1 exact-estimate all-reduce (DDP)."
    )
    print()
    print(comparison["table"])
    return {
        "rows": rows,
        "n_params": n_params,
        "cost_model": comparison["rows"],
        "machine": machine_description(device),
    }
