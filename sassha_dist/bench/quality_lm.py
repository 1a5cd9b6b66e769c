"""Validation loss of a tiny GPT trained from scratch: SASSHA vs AdamW vs SAM-AdamW.

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
steps, cosine to 10% of the peak; no gradient clipping; weight decay 0.

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
from sassha_dist.bench.quality import Grid, mean_std, pm, tune, warmup_cosine

__all__ = ["GRIDS", "add_arguments", "load_blocks", "run"]

LABELS = {"adamw": "AdamW", "sam-adamw": "SAM-AdamW", "sassha": "SASSHA"}

#: Declared tuning grids (see :mod:`sassha_dist.bench.quality` for how stages work).
GRIDS: dict[str, Grid] = {
    "adamw": Grid(
        {"lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 0.0},
        (({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}),),
    ),
    "sam-adamw": Grid(
        {"lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 0.0, "rho": 0.05},
        (({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}), ({"rho": 0.02}, {"rho": 0.1})),
    ),
    "sassha": Grid(
        {"lr": 0.1, "betas": (0.965, 0.99), "weight_decay": 0.0, "rho": 0.02, "lazy_hessian": 10},
        (({"lr": 0.03}, {"lr": 0.1}, {"lr": 0.3}), ({"rho": 0.005}, {"rho": 0.05})),
    ),
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
    final_splits: tuple[str, ...] = ("tune", "report"),
) -> dict[str, Any]:
    """One run; returns the curve (step, wall seconds, tune loss) and the final losses."""
    model = build_lm("tiny", seed=seed)
    opt = build_optimizer(optimizer_name, model.parameters(), **hparams)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
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
        loss = train_step(opt, lambda ids=ids: model(input_ids=ids, labels=ids).loss)
        schedule.step()
        elapsed += time.perf_counter() - start
        if not math.isfinite(float(loss)):
            diverged = True
            break
        if step % eval_every == 0 or step == steps:
            curve.append((step, elapsed, evaluate(model, curve_blocks)))
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


def calibrate(
    configs: dict[str, dict[str, Any]], data: dict[str, torch.Tensor], batch_size: int, rounds: int
) -> dict[str, float]:
    """Median seconds per training step of each tuned optimizer, interleaved in this process."""
    base = build_lm("tiny", seed=0)
    batches = [data["train"][i * batch_size : (i + 1) * batch_size] for i in range(4)]
    contestants = []
    for name, hparams in configs.items():
        model = copy.deepcopy(base)
        opt = build_optimizer(name, model.parameters(), **hparams)

        def run(n, model=model, opt=opt, cursor={"i": 0}):  # noqa: B006 (per-contestant state)
            for _ in range(n):
                ids = batches[cursor["i"] % len(batches)]
                cursor["i"] += 1
                train_step(opt, lambda ids=ids: model(input_ids=ids, labels=ids).loss)

        contestants.append(Contestant(name, run))
    lazy = max(int(h.get("lazy_hessian", 1)) for h in configs.values())
    times = interleaved_times(contestants, rounds=rounds, steps_per_round=lazy, device=torch.device("cpu"))
    return {name: median(t) for name, t in times.items()}


def measure(
    *,
    steps: int = 800,
    seeds: int = 3,
    batch_size: int = 16,
    seq_len: int = 64,
    eval_every: int = 50,
    eval_blocks: int | None = None,
    grid: str = "full",
    calibration_rounds: int = 5,
    optimizers: tuple[str, ...] = ("adamw", "sam-adamw", "sassha"),
    verbose: bool = True,
) -> dict[str, Any]:
    log = (lambda msg: print(f"[quality-lm] {msg}", file=sys.stderr, flush=True)) if verbose else None
    wall = time.perf_counter()
    data = load_blocks(seq_len)
    common = {"data": data, "batch_size": batch_size, "eval_every": eval_every, "eval_blocks": eval_blocks}
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

    step_seconds = calibrate(best, data, batch_size, calibration_rounds)
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
                pm(equal_steps),
                pm(equal_time),
                result["equal_time_steps"][name],
                1e3 * step_seconds[name],
                step_seconds[name] / step_seconds["adamw"] if "adamw" in step_seconds else float("nan"),
            ]
        )
    n_seeds = len(next(iter(runs.values())))
    lines = [
        f"quality-lm: tiny GPT-2 from scratch on the stdlib-docstring corpus, byte tokens, batch "
        f"{result['batch_size']}x{result['seq_len']}, {result['steps']} steps; report-half validation loss "
        f"(nats/byte), mean ± std over {n_seeds} seeds; {result['machine']}",
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
    colors = {"adamw": "tab:blue", "sam-adamw": "tab:orange", "sassha": "tab:green"}
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
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--eval-blocks", type=int, default=None, help="tune-half blocks for the curves (default: all)"
    )
    parser.add_argument(
        "--grid",
        default="full",
        choices=["full", "center"],
        help="center: each grid's base only (smoke tests)",
    )
    parser.add_argument("--calibration-rounds", type=int, default=5)
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
        eval_blocks=args.eval_blocks,
        grid=args.grid,
        calibration_rounds=args.calibration_rounds,
        optimizers=tuple(args.optimizers),
    )
    print(report(result))
    if args.plot is not None:
        plot(result, args.plot)
        print(f"curves: {args.plot}")
    return result
