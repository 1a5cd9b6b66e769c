"""Test accuracy and sharpness of a small classifier: SASSHA (and rho = 0), M-SASSHA, AdamW, SAM-AdamW.

The paper's claim under test: SASSHA reaches flatter minima (a smaller
largest Hessian eigenvalue of the training loss) that generalise better.

Data (``--data``):

* ``digits`` (default): scikit-learn's bundled 8x8 handwritten digits (1797
  images, 10 classes; no download; needs ``pip install scikit-learn``);
  features scaled to [0, 1];
* ``synthetic``: no dependency. 64 Gaussian features, labels from a fixed
  random teacher network (argmax of a 64-32-10 tanh MLP), 10% of training
  labels replaced by random ones so that memorising them hurts.

Splits (fixed, seed 0): test 30%; of the rest, 20% validation (tuning only)
and 80% training. Model: MLP 64-128-128-10 with GELU (smooth, so the Hessian
is well defined), cross-entropy, batches of 32, ``--epochs`` epochs, linear
warm-up over 5% of the steps then cosine to 10% of the peak, no weight decay.
Each optimizer's declared grid (:data:`GRIDS`) is tuned on seed 0 by
validation accuracy (ties: validation loss); the tuned setting then runs on
every seed. Sharpness: the largest eigenvalue of the Hessian of the
full-training-set loss at the final weights, by power iteration with exact
Hessian-vector products (:func:`~sassha_dist.bench.quality.hessian_max_eigenvalue`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sassha_dist.bench.common import format_table, machine_description
from sassha_dist.bench.models import build_optimizer, train_step
from sassha_dist.bench.quality import (
    Grid,
    Schedule,
    hessian_max_eigenvalue,
    mean_std,
    pm,
    tune,
    warmup_cosine,
)

__all__ = ["GRIDS", "add_arguments", "load_data", "run"]

LABELS = {
    "adamw": "AdamW",
    "sam-adamw": "SAM-AdamW",
    "sassha": "SASSHA",
    "sassha-rho0": "SASSHA, rho = 0",
    "msassha": "M-SASSHA",
}
_OPTIMIZER = {
    "adamw": "adamw",
    "sam-adamw": "sam-adamw",
    "sassha": "sassha",
    "sassha-rho0": "sassha",
    "msassha": "msassha",
}

_LR_ADAM = (({"lr": 3e-4}, {"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}, {"lr": 3e-2}, {"lr": 0.1}),)
_LR_SASSHA = (({"lr": 0.01}, {"lr": 0.03}, {"lr": 0.1}, {"lr": 0.3}, {"lr": 1.0}),)
_RHO = ({"rho": 0.01}, {"rho": 0.02}, {"rho": 0.1}, {"rho": 0.2}, {"rho": 0.5}, {"rho": 1.0})

_SASSHA_GRID = Grid({"lr": 0.1, "weight_decay": 0.0, "rho": 0.05, "lazy_hessian": 10}, (*_LR_SASSHA, _RHO))

#: Declared tuning grids (see :mod:`sassha_dist.bench.quality` for how stages work).
GRIDS: dict[str, Grid] = {
    "adamw": Grid({"lr": 1e-3, "weight_decay": 0.0}, _LR_ADAM),
    "sam-adamw": Grid(
        {"lr": 1e-3, "weight_decay": 0.0, "rho": 0.05},
        (*_LR_ADAM, _RHO),
    ),
    "sassha": _SASSHA_GRID,
    "sassha-rho0": Grid({"lr": 0.1, "weight_decay": 0.0, "rho": 0.0, "lazy_hessian": 10}, _LR_SASSHA),
    "msassha": _SASSHA_GRID,  # the same budget; rho is the same radius, ||w~ - w|| = rho
}


def load_data(name: str = "digits") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``train``, ``val`` and ``test`` as ``(x float32 [n, 64], y int64 [n])``."""
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise SystemExit(
                "quality-classifier --data digits needs scikit-learn (pip install scikit-learn); "
                "--data synthetic needs nothing."
            ) from error
        bunch = load_digits()
        x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
        y = torch.tensor(bunch.target, dtype=torch.long)
        noise = 0.0
    elif name == "synthetic":
        gen = torch.Generator().manual_seed(12345)
        x = torch.randn(3000, 64, generator=gen)
        w1 = torch.randn(64, 32, generator=gen) / 8.0
        w2 = torch.randn(32, 10, generator=gen) / math.sqrt(32)
        y = (torch.tanh(x @ w1 * 3.0) @ w2).argmax(dim=1)
        noise = 0.1
    else:
        raise ValueError(f"Invalid data={name!r}. Must be 'digits' or 'synthetic'.")
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(x.shape[0], generator=gen)
    n_test = round(0.3 * x.shape[0])
    rest = order[n_test:]
    n_val = round(0.2 * rest.numel())
    splits = {"test": order[:n_test], "val": rest[:n_val], "train": rest[n_val:]}
    data = {k: (x[idx], y[idx].clone()) for k, idx in splits.items()}
    if noise:
        ytrain = data["train"][1]
        flip = torch.rand(ytrain.numel(), generator=gen) < noise
        ytrain[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
    return data


def build_mlp(seed: int, width: int = 128) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10)
        )


@torch.no_grad()
def _metrics(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    x, y = split
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(
    name: str,
    hparams: dict[str, Any],
    *,
    seed: int,
    epochs: int,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 32,
    sharpness: bool = True,
    matched_loss: float = 0.01,
    sharpness_iterations: int = 100,
) -> dict[str, Any]:
    """One run. With ``sharpness``, the largest Hessian eigenvalue at the end and at the first epoch
    whose training loss is at most ``matched_loss`` (a comparison at equal training loss)."""
    model = build_mlp(seed)
    opt = build_optimizer(_OPTIMIZER[name], model.parameters(), **hparams)
    x, y = data["train"]
    per_epoch = math.ceil(x.shape[0] / batch_size)
    schedule = Schedule(opt, warmup_cosine(epochs * per_epoch))
    gen = torch.Generator().manual_seed(1000 + seed)
    curve = []
    elapsed = 0.0
    diverged = False
    final: dict[str, Any] = {}

    def lambda_max() -> float:
        return hessian_max_eigenvalue(
            lambda: nn.functional.cross_entropy(model(x), y),
            list(model.parameters()),
            iterations=sharpness_iterations,
            seed=seed,
        )

    for epoch in range(1, epochs + 1):
        order = torch.randperm(x.shape[0], generator=gen)
        start = time.perf_counter()
        for i in range(per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            loss = train_step(opt, lambda xb=xb, yb=yb: nn.functional.cross_entropy(model(xb), yb))
            schedule.step()
        elapsed += time.perf_counter() - start
        if not math.isfinite(float(loss)):
            diverged = True
            break
        train_loss, _ = _metrics(model, data["train"])
        test_loss, test_acc = _metrics(model, data["test"])
        curve.append((epoch, train_loss, test_acc, test_loss))
        if sharpness and "matched_sharpness" not in final and train_loss <= matched_loss:
            final["matched_sharpness"], final["matched_epoch"] = lambda_max(), epoch
    for split in ("train", "val", "test"):
        loss, acc = (math.inf, 0.0) if diverged else _metrics(model, data[split])
        final[f"{split}_loss"], final[f"{split}_acc"] = loss, acc
    if sharpness and not diverged:
        final["sharpness"] = lambda_max()
    return {
        "name": name,
        "hparams": hparams,
        "seed": seed,
        "curve": curve,
        "final": final,
        "train_seconds": elapsed,
        "steps": epochs * per_epoch,
        "diverged": diverged,
    }


def measure(
    *,
    data_name: str = "digits",
    epochs: int = 40,
    seeds: int = 10,
    grid: str = "full",
    matched_loss: float = 0.01,
    sharpness_iterations: int = 100,
    optimizers: tuple[str, ...] = tuple(GRIDS),
    verbose: bool = True,
) -> dict[str, Any]:
    log = (lambda msg: print(f"[quality-classifier] {msg}", file=sys.stderr, flush=True)) if verbose else None
    wall = time.perf_counter()
    data = load_data(data_name)
    best, trials, runs = {}, {}, {}
    for name in optimizers:
        g = GRIDS[name] if grid == "full" else GRIDS[name].center()
        cache: dict[str, dict[str, Any]] = {}

        def evaluate_config(hparams, name=name, cache=cache):
            result = train(name, hparams, seed=0, epochs=epochs, data=data, sharpness=False)
            cache[repr(sorted(hparams.items()))] = result
            f = result["final"]
            # lower is better: validation error first, validation loss breaks ties
            return (1.0 - f["val_acc"]) + 1e-3 * min(f["val_loss"], 100.0), {"val_acc": f["val_acc"]}

        if log:
            log(f"tuning {LABELS[name]} over {max(1, g.size())} configurations")
        best[name], all_trials = tune(g, evaluate_config, log=log)
        trials[name] = [{"hparams": t.hparams, **t.metrics} for t in all_trials]
        runs[name] = []
        for seed in range(seeds):
            runs[name].append(
                train(
                    name,
                    best[name],
                    seed=seed,
                    epochs=epochs,
                    data=data,
                    matched_loss=matched_loss,
                    sharpness_iterations=sharpness_iterations,
                )
            )
            if log:
                f = runs[name][-1]["final"]
                log(
                    f"{LABELS[name]} seed {seed}: test acc {f['test_acc']:.4f}, "
                    f"sharpness {f.get('sharpness')}"
                )
    return {
        "machine": machine_description(torch.device("cpu")),
        "data": data_name,
        "sizes": {k: int(v[0].shape[0]) for k, v in data.items()},
        "epochs": epochs,
        "seeds": seeds,
        "matched_loss": matched_loss,
        "grid": grid,
        "grids": {name: GRIDS[name].describe() for name in optimizers},
        "best": best,
        "trials": trials,
        "runs": runs,
        "wall_seconds": time.perf_counter() - wall,
    }


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


def _pm_key(finals: list[dict[str, Any]], key: str, scale: float = 1.0, digits: int = 2) -> str:
    values = [scale * f[key] for f in finals if key in f]
    if not values:
        return "n/a"
    missing = len(finals) - len(values)
    return pm(values, digits) + (f" ({missing} n/a)" if missing else "")


def _paired_difference(result: dict[str, Any], name: str, reference: str = "sassha") -> str:
    """Mean ± standard error over seeds of test accuracy (points) of ``name`` minus ``reference``.

    Seeds pair up: the same seed gives every optimizer the same initial weights and batch order.
    """
    if name == reference or reference not in result["runs"]:
        return ""
    ours = {r["seed"]: r for r in result["runs"][reference] if not r["diverged"]}
    diffs = [
        100 * (r["final"]["test_acc"] - ours[r["seed"]]["final"]["test_acc"])
        for r in result["runs"][name]
        if not r["diverged"] and r["seed"] in ours
    ]
    if len(diffs) < 2:
        return "n/a"
    mean, std = mean_std(diffs)
    return f"{mean:+.2f} ± {std / math.sqrt(len(diffs)):.2f}"


def report(result: dict[str, Any]) -> str:
    rows = []
    for name, runs in result["runs"].items():
        finals = [r["final"] for r in runs if not r["diverged"]]
        hp = result["best"][name]
        tuned = ", ".join(f"{k}={v:g}" for k, v in hp.items() if k in ("lr", "rho"))
        epochs = [f["matched_epoch"] for f in finals if "matched_epoch" in f]
        rows.append(
            [
                LABELS[name],
                tuned,
                _pm_key(finals, "test_acc", 100.0),
                _paired_difference(result, name),
                _pm_key(finals, "test_loss", digits=3),
                _pm_key(finals, "train_loss", digits=4),
                _pm_key(finals, "sharpness", digits=3),
                _pm_key(finals, "matched_sharpness", digits=2),
                f"{min(epochs)}-{max(epochs)}" if epochs else "n/a",
                f"{len(runs) - len(finals)}",
            ]
        )
    everything = [r["final"] for runs in result["runs"].values() for r in runs if not r["diverged"]]
    correlations = []
    for key, label in (("sharpness", "final"), ("matched_sharpness", "at matched training loss")):
        pairs = [(f[key], f["test_acc"]) for f in everything if key in f]
        if len(pairs) > 2:
            rho = _spearman([p[0] for p in pairs], [p[1] for p in pairs])
            correlations.append(f"{label} {rho:.2f} ({len(pairs)} runs)")
    sizes = result["sizes"]
    matched = result["matched_loss"]
    lines = [
        f"quality-classifier: {result['data']} (train {sizes['train']}, val {sizes['val']}, "
        f"test {sizes['test']}), MLP 64-128-128-10, {result['epochs']} epochs of batch 32; "
        f"mean ± std over {result['seeds']} seeds; {result['machine']}",
        "",
        format_table(
            [
                "optimizer",
                "tuned",
                "test acc %",
                "minus SASSHA (paired, ± s.e.)",
                "test loss",
                "train loss",
                "lambda_max, final",
                f"lambda_max at train loss <= {matched:g}",
                "at epoch",
                "diverged",
            ],
            rows,
        ),
        "",
        "lambda_max: largest Hessian eigenvalue of the full training loss (power iteration, exact HVPs)",
        "Spearman rank correlation of lambda_max and test accuracy: " + "; ".join(correlations),
        "grids (seed 0, judged on validation accuracy):",
        *[f"  {LABELS[n]}: {d}" for n, d in result["grids"].items()],
        f"wall time of this run: {result['wall_seconds'] / 60:.1f} min",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "adamw": "tab:blue",
        "sam-adamw": "tab:orange",
        "sassha": "tab:green",
        "sassha-rho0": "tab:red",
        "msassha": "tab:purple",
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, runs in result["runs"].items():
        for i, r in enumerate(runs):
            label = LABELS[name] if i == 0 else None
            epochs = [c[0] for c in r["curve"]]
            axes[0].plot(epochs, [c[1] for c in r["curve"]], color=colors[name], alpha=0.7, label=label)
            axes[1].plot(epochs, [100 * c[2] for c in r["curve"]], color=colors[name], alpha=0.7, label=label)
            f = r["final"]
            if "sharpness" in f:
                axes[2].scatter(f["sharpness"], 100 * f["test_acc"], color=colors[name], label=label)
            if "matched_sharpness" in f:
                axes[2].scatter(
                    f["matched_sharpness"], 100 * f["test_acc"], facecolors="none", edgecolors=colors[name]
                )
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training loss")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("test accuracy (%)")
    accs = [100 * c[2] for runs in result["runs"].values() for r in runs for c in r["curve"]]
    axes[1].set_ylim(max(min(accs), max(accs) - 10), max(accs) + 0.5)
    axes[2].set_xscale("log")
    axes[2].set_xlabel(
        f"lambda_max of the train loss\nfilled: final; open: at train loss <= {result['matched_loss']:g}"
    )
    axes[2].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MLP on {result['data']}: one line or point per seed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits", choices=["digits", "synthetic"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument(
        "--matched-loss",
        type=float,
        default=0.01,
        help="also measure sharpness at the first epoch whose training loss is at most this",
    )
    parser.add_argument("--sharpness-iterations", type=int, default=100, help="power-iteration steps")
    parser.add_argument(
        "--grid",
        default="full",
        choices=["full", "center"],
        help="center: each grid's base only (smoke tests)",
    )
    parser.add_argument("--optimizers", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--plot", type=Path, default=None, help="write curves and the sharpness plot here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = measure(
        data_name=args.data,
        epochs=args.epochs,
        seeds=args.seeds,
        grid=args.grid,
        optimizers=tuple(args.optimizers),
        matched_loss=args.matched_loss,
        sharpness_iterations=args.sharpness_iterations,
    )
    print(report(result))
    if args.plot is not None:
        plot(result, args.plot)
        print(f"curves: {args.plot}")
    return result
