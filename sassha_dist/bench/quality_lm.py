"""Validation loss of a tiny GPT trained from scratch: SASSHA and M-SASSHA vs AdamW and SAM-AdamW.

Data: the standard-library docstring corpus of
:func:`sassha_dist.integrations.embedded.stdlib_corpus` (built at run time,
no download), as byte-level tokens (token = UTF-8 byte, exactly the ids of
``embedded.byte_tokenizer``), cut into non-overlapping blocks. Its validation
split is halved: the first half ("tune") picks hyperparameters and draws the
curves, the second ("report") gives the reported losses.

Model: the tiny GPT-2 (2 layers, ``n_embd`` 64, ~125k parameters, eager
attention, no dropout), trained from scratch. Each optimizer has a declared
grid (:data:`GRIDS`, tuned on seed 0 at the full step budget), then runs at
its best setting on every seed. Schedules: linear warm-up over 5% of the
steps, cosine to 10% of the peak; the gradient the update uses (for SAM-AdamW
and SASSHA the perturbed one) clipped to norm 1, as in the authors' GPT-2
recipe; weight decay 0.

Two comparisons:

* equal steps: every optimizer runs ``--steps`` steps;
* equal wall time: each optimizer gets ``--steps * t(AdamW) / t(optimizer)``
  steps (its own full schedule), the step times measured in this process
  after tuning, in interleaved rounds, so the comparison does not depend on
  how loaded the machine was while each run happened to train.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sassha_dist.bench.common import Contestant, format_table, interleaved_times, machine_description, median
from sassha_dist.bench.models import build_lm, build_optimizer, train_step
from sassha_dist.bench.quality import Grid, Schedule, pm, tune, warmup_cosine

__all__ = ["GRIDS", "add_arguments", "load_blocks", "run"]

LABELS = {"adamw": "AdamW", "sam-adamw": "SAM-AdamW", "sassha": "SASSHA", "msassha": "M-SASSHA"}

_SASSHA_GRID = Grid(
    {"lr": 1.0, "betas": (0.965, 0.99), "weight_decay": 0.0, "rho": 0.02, "lazy_hessian": 10},
    (({"lr": 0.3}, {"lr": 1.0}, {"lr": 3.0}), ({"rho": 0.005}, {"rho": 0.01}, {"rho": 0.05})),
)

#: Declared tuning grids (see :mod:`sassha_dist.bench.quality` for how stages work).
GRIDS: dict[str, Grid] = {
    "adamw": Grid(
        {"lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 0.0},
        (({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}),),
    ),
    "sam-adamw": Grid(
        {"lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 0.0, "rho": 0.05},
        (({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}), ({"rho": 0.01}, {"rho": 0.02}, {"rho": 0.1})),
    ),
    "sassha": _SASSHA_GRID,
    "msassha": _SASSHA_GRID,  # the same budget; rho is the same radius, ||w~ - w|| = rho
}


def load_blocks(seq_len: int) -> dict[str, torch.Tensor]:
    """``train``, ``tune`` and ``report`` blocks ``[n, seq_len]`` of byte tokens."""
    from sassha_dist.integrations.embedded import stdlib_corpus

    corpus = stdlib_corpus()

    def blocks(text: str) -> torch.Tensor:
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        n = ids.numel() // seq_len
        return ids[: n * seq_len].view(n, seq_len)

    validation = blocks(corpus.validation)
    half = validation.shape[0] // 2
    return {"train": blocks(corpus.train), "tune": validation[:half], "report": validation[half:]}


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss (nats per byte) over ``blocks``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        n = ids.numel() - ids.shape[0]  # predicted tokens
        total += float(model(input_ids=ids, labels=ids).loss) * n
        count += n
    model.train()
    return total / count


def train(
    optimizer_name: str,
    hparams: dict[str, Any],
    *,
    seed: int,
    steps: int,
    data: dict[str, torch.Tensor],
    batch_size: int,
    eval_every: int,
    eval_blocks: int | None,
    warmup_steps: int,
    max_grad_norm: float | None,
    final_splits: tuple[str, ...] = ("tune", "report"),
) -> dict[str, Any]:
    """One run; returns the curve (step, wall seconds, tune loss) and the final losses.

    A run diverges (and stops) when its training loss is non-finite, or when
    a curve point's validation loss is more than 0.5 nat above the untrained
    model's; its final losses are then infinite.
    """
    model = build_lm("tiny", seed=seed)
    opt = build_optimizer(optimizer_name, model.parameters(), **hparams)
    schedule = Schedule(opt, warmup_cosine(steps, warmup_steps=warmup_steps))
    train_blocks = data["train"]
    curve_blocks = data["tune"] if eval_blocks is None else data["tune"][:eval_blocks]
    gen = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(train_blocks.shape[0], generator=gen)
    cursor = 0
    curve = [(0, 0.0, evaluate(model, curve_blocks))]
    elapsed = 0.0
    diverged = False
    for step in range(1, steps + 1):
        if cursor + batch_size > order.numel():
            order, cursor = torch.randperm(train_blocks.shape[0], generator=gen), 0
        ids = train_blocks[order[cursor : cursor + batch_size]]
        cursor += batch_size
        start = time.perf_counter()
        loss = train_step(
            opt, lambda ids=ids: model(input_ids=ids, labels=ids).loss, max_grad_norm=max_grad_norm
        )
        schedule.step()
        elapsed += time.perf_counter() - start
        if not math.isfinite(float(loss)):
            diverged = True
            break
        if step % eval_every == 0 or step == steps:
            curve.append((step, elapsed, evaluate(model, curve_blocks)))
            if not curve[-1][2] <= curve[0][2] + 0.5:
                diverged = True
                break
    final = {split: (math.inf if diverged else evaluate(model, data[split])) for split in final_splits}
    return {
        "optimizer": optimizer_name,
        "hparams": hparams,
        "seed": seed,
        "steps": steps,
        "curve": curve,
        "train_seconds": elapsed,
        "diverged": diverged,
        "final": final,
        "skipped_steps": getattr(opt, "skipped_steps", 0),
    }


def _stepper(model, opt, batches: list[torch.Tensor], max_grad_norm: float | None):
    cursor = {"i": 0}

    def run(n: int) -> None:
        for _ in range(n):
            ids = batches[cursor["i"] % len(batches)]
            cursor["i"] += 1
            train_step(
                opt, lambda ids=ids: model(input_ids=ids, labels=ids).loss, max_grad_norm=max_grad_norm
            )

    return run


def calibrate(
    configs: dict[str, dict[str, Any]],
    data: dict[str, torch.Tensor],
    batch_size: int,
    rounds: int,
    max_grad_norm: float | None,
) -> dict[str, float]:
    """Median seconds per training step of each tuned optimizer, interleaved in this process."""
    base = build_lm("tiny", seed=0)
    batches = [data["train"][i * batch_size : (i + 1) * batch_size] for i in range(4)]
    contestants = []
    for name, hparams in configs.items():
        model = copy.deepcopy(base)
        opt = build_optimizer(name, model.parameters(), **hparams)
        contestants.append(Contestant(name, _stepper(model, opt, batches, max_grad_norm)))
    lazy = max(int(h.get("lazy_hessian", 1)) for h in configs.values())
    times = interleaved_times(contestants, rounds=rounds, steps_per_round=lazy, device=torch.device("cpu"))
    return {name: median(t) for name, t in times.items()}


def measure(
    *,
    steps: int = 1200,
    seeds: int = 3,
    batch_size: int = 8,
    seq_len: int = 64,
    eval_every: int = 50,
    eval_blocks: int | None = 128,
    grid: str = "full",
    calibration_rounds: int = 5,
    clip: float = 1.0,
    optimizers: tuple[str, ...] = tuple(GRIDS),
    verbose: bool = True,
) -> dict[str, Any]:
    log = (lambda msg: print(f"[quality-lm] {msg}", file=sys.stderr, flush=True)) if verbose else None
    wall = time.perf_counter()
    data = load_blocks(seq_len)
    common = {
        "data": data,
        "batch_size": batch_size,
        "eval_every": eval_every,
        "eval_blocks": eval_blocks,
        "warmup_steps": max(1, round(0.05 * steps)),  # the same warm-up for equal-time runs
        "max_grad_norm": clip or None,
    }
    best: dict[str, dict[str, Any]] = {}
    trials: dict[str, list[dict[str, Any]]] = {}
    seed0: dict[str, dict[str, Any]] = {}
    for name in optimizers:
        g = GRIDS[name] if grid == "full" else GRIDS[name].center()
        cache: dict[str, dict[str, Any]] = {}

        def evaluate_config(hparams, name=name, cache=cache):
            result = train(name, hparams, seed=0, steps=steps, final_splits=("tune", "report"), **common)
            cache[repr(sorted(hparams.items()))] = result
            return result["final"]["tune"], {"tune": result["final"]["tune"]}

        if log:
            log(f"tuning {LABELS[name]} over {max(1, g.size())} configurations, {steps} steps each")
        best[name], all_trials = tune(g, evaluate_config, log=log)
        trials[name] = [{"hparams": t.hparams, "tune_loss": t.score} for t in all_trials]
        seed0[name] = cache[repr(sorted(best[name].items()))]

    step_seconds = calibrate(best, data, batch_size, calibration_rounds, common["max_grad_norm"])
    equal_time_steps = {
        name: max(1, round(steps * step_seconds["adamw"] / step_seconds[name])) if "adamw" in best else steps
        for name in optimizers
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [seed0[name]] for name in optimizers}
    timed: dict[str, list[dict[str, Any]]] = {name: [] for name in optimizers}
    for name in optimizers:
        for seed in range(seeds):
            if seed > 0:
                if log:
                    log(f"{LABELS[name]} seed {seed}, {steps} steps")
                runs[name].append(train(name, best[name], seed=seed, steps=steps, **common))
            if equal_time_steps[name] == steps:
                timed[name].append(runs[name][seed])
            else:
                if log:
                    log(f"{LABELS[name]} seed {seed}, equal time: {equal_time_steps[name]} steps")
                timed[name].append(train(name, best[name], seed=seed, steps=equal_time_steps[name], **common))
    return {
        "machine": machine_description(torch.device("cpu")),
        "steps": steps,
        "seeds": seeds,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "grid": grid,
        "clip": clip,
        "n_blocks": {k: int(v.shape[0]) for k, v in data.items()},
        "grids": {name: GRIDS[name].describe() for name in optimizers},
        "best": best,
        "trials": trials,
        "step_seconds": step_seconds,
        "equal_time_steps": equal_time_steps,
        "runs": runs,
        "equal_time_runs": timed,
        "wall_seconds": time.perf_counter() - wall,
    }


def _summary(values: list[float]) -> str:
    """Mean ± std of the runs that did not diverge, and how many did."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "all diverged"
    diverged = len(values) - len(finite)
    return pm(finite) + (f" ({diverged} of {len(values)} diverged)" if diverged else "")


def report(result: dict[str, Any]) -> str:
    runs, timed = result["runs"], result["equal_time_runs"]
    step_seconds = result["step_seconds"]
    rows = []
    for name in runs:
        equal_steps = [r["final"]["report"] for r in runs[name]]
        equal_time = [r["final"]["report"] for r in timed[name]]
        hp = result["best"][name]
        tuned = ", ".join(f"{k}={v:g}" for k, v in hp.items() if k in ("lr", "rho"))
        rows.append(
            [
                LABELS[name],
                tuned,
                _summary(equal_steps),
                _summary(equal_time),
                result["equal_time_steps"][name],
                1e3 * step_seconds[name],
                step_seconds[name] / step_seconds["adamw"] if "adamw" in step_seconds else float("nan"),
            ]
        )
    n_seeds = len(next(iter(runs.values())))
    lines = [
        f"quality-lm: tiny GPT-2 from scratch on the stdlib-docstring corpus, byte tokens, batch "
        f"{result['batch_size']}x{result['seq_len']}, {result['steps']} steps, gradient clipping "
        f"{result['clip'] or 'off'}; report-half validation loss (nats/byte), mean ± std over {n_seeds} "
        f"seeds; {result['machine']}",
        "",
        format_table(
            [
                "optimizer",
                "tuned",
                f"val loss, {result['steps']} steps",
                "val loss, equal time",
                "steps in equal time",
                "ms/step",
                "x AdamW",
            ],
            rows,
        ),
        "",
        "grids (seed 0, judged on the tune half):",
        *[f"  {LABELS[n]}: {d}" for n, d in result["grids"].items()],
        f"wall time of this run: {result['wall_seconds'] / 60:.1f} min",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = {"adamw": "tab:blue", "sam-adamw": "tab:orange", "sassha": "tab:green", "msassha": "tab:purple"}
    for name, runs in result["runs"].items():
        seconds = result["step_seconds"][name]
        for i, r in enumerate(runs):
            steps = [c[0] for c in r["curve"]]
            losses = [c[2] for c in r["curve"]]
            label = LABELS[name] if i == 0 else None
            axes[0].plot(steps, losses, color=colors[name], alpha=0.8, label=label)
        for i, r in enumerate(result["equal_time_runs"][name]):
            steps = [c[0] for c in r["curve"]]
            losses = [c[2] for c in r["curve"]]
            label = LABELS[name] if i == 0 else None
            axes[1].plot([s * seconds for s in steps], losses, color=colors[name], alpha=0.8, label=label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("time (s): steps x measured step time")
    axes[0].set_ylabel("validation loss, tune half (nats/byte)")
    axes[0].set_title(f"equal steps ({result['steps']})")
    axes[1].set_title("equal wall time (each with its own schedule)")
    low = min(c[2] for runs in result["runs"].values() for r in runs for c in r["curve"])
    for ax in axes:
        ax.set_ylim(low - 0.05, low + 1.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("tiny GPT-2 on the stdlib-docstring corpus (one line per seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--eval-blocks", type=int, default=128, help="tune-half blocks for the curves (0: all)"
    )
    parser.add_argument(
        "--grid",
        default="full",
        choices=["full", "center"],
        help="center: each grid's base only (smoke tests)",
    )
    parser.add_argument("--calibration-rounds", type=int, default=5)
    parser.add_argument(
        "--clip", type=float, default=1.0, help="clip the gradient the update uses to this norm (0: off)"
    )
    parser.add_argument("--optimizers", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--plot", type=Path, default=None, help="write the loss curves to this PNG")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if "adamw" not in args.optimizers:
        raise SystemExit("quality-lm: --optimizers must include adamw (the baseline of the ratios).")
    result = measure(
        steps=args.steps,
        seeds=args.seeds,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=args.eval_every,
        eval_blocks=args.eval_blocks or None,
        grid=args.grid,
        calibration_rounds=args.calibration_rounds,
        clip=args.clip,
        optimizers=tuple(args.optimizers),
    )
    print(report(result))
    if args.plot is not None:
        plot(result, args.plot)
        print(f"curves: {args.plot}")
    return result
