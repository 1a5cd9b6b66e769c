"""Step time of SASSHA against AdamW and SAM-AdamW, next to the floor its passes impose.

All optimizers train their own copy of one freshly initialised GPT-2 on the
same batches (random tokens: timing only), in interleaved rounds
(:func:`~sassha_dist.bench.common.interleaved_times`). Three pass references
are timed in the same rounds on another copy:

* ``fwd+bwd``: one forward and backward pass, the unit of the floor;
* ``exact HVP pass``: a forward pass, the gradient with ``create_graph=True``
  and one double backward with a fixed Rademacher probe. It replaces the
  perturbed pass on SASSHA's exact-Hessian steps, so its extra cost is
  ``c_exact = t(exact HVP pass) / t(fwd+bwd) - 1``;
* ``FD passes``: the two forward-backward passes of a central finite
  difference, ``c_fd = t(2 passes) / t(fwd+bwd)`` (about 2 by construction).

Floors in forward-backward passes: AdamW 1, SAM-AdamW 2, SASSHA
``2 + c / k``, and ``1 + c / k`` for the ``SASSHA ρ=0`` and ``M-SASSHA`` rows
(one per Hessian method, at the largest k): with ``rho = 0``, or with the
momentum ascent (``perturbation="momentum"``), a step runs one pass, plus the
Hessian work on refresh steps. ``x floor`` is the optimizer's time over its floor's time
(``floor * t(fwd+bwd)``), so what it shows above 1 is everything but the
passes: the update, the perturbation, probe generation, copies and Python.
Every ratio is the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from typing import Any

import torch

from sassha_dist.bench.common import (
    DTYPES,
    Contestant,
    autocast_context,
    format_table,
    interleaved_times,
    machine_description,
    median,
    resolve_device,
)
from sassha_dist.bench.models import MODEL_SIZES, build_lm, count_parameters, random_token_batches, train_step
from sassha_dist.bench.models import build_optimizer as _build_optimizer
from sassha_dist.hessian.hvp import exact_hvp
from sassha_dist.hessian.probes import probe_key, rademacher_ranges

__all__ = ["FLOOR_TOLERANCE", "add_arguments", "measure", "run"]

#: The target: SASSHA's step within 10% of the time its passes take.
FLOOR_TOLERANCE = 1.10
#: M-SASSHA's target: within 5% of its one-pass floor (its step adds one norm and one copy).
MOMENTUM_FLOOR_TOLERANCE = 1.05

_EXACT_REF, _FD_REF, _PROBE_REF = "exact HVP pass", "FD passes (central)", "probe generation"
_DEFAULT_SHAPE = {"tiny": (8, 64), "small": (8, 128), "gpt2-small": (8, 512)}


@dataclass(frozen=True)
class _Spec:
    name: str
    optimizer: str
    hparams: dict[str, Any]
    k: int | None = None
    method: str | None = None
    one_pass: bool = False  # rho = 0 or M-SASSHA: one forward-backward per step, not two
    tolerance: float = FLOOR_TOLERANCE


def _specs(ks: list[int], methods: list[str], dtype: str, foreach: bool | None) -> list[_Spec]:
    specs = [
        _Spec("AdamW", "adamw", {"lr": 1e-4, "weight_decay": 0.01, "foreach": foreach}),
        _Spec("SAM-AdamW", "sam-adamw", {"lr": 1e-4, "weight_decay": 0.01, "rho": 0.05, "foreach": foreach}),
    ]
    for method in methods:
        for k in ks:
            hparams = _sassha_hparams(method, k, 0.05, dtype, foreach)
            specs.append(_Spec(f"SASSHA {_label(method)} k={k}", "sassha", hparams, k=k, method=method))
    k = max(ks)  # rho = 0, the one-pass step: at the largest k (10 by default)
    for method in methods:
        hparams = _sassha_hparams(method, k, 0.0, dtype, foreach)
        name = f"SASSHA ρ=0 {_label(method)} k={k}"
        specs.append(_Spec(name, "sassha", hparams, k=k, method=method, one_pass=True))
    for method in methods:  # M-SASSHA: the ascent follows the momentum, one pass per step
        hparams = {**_sassha_hparams(method, k, 0.05, dtype, foreach), "perturbation": "momentum"}
        name = f"M-SASSHA {_label(method)} k={k}"
        specs.append(
            _Spec(
                name, "sassha", hparams, k=k, method=method, one_pass=True, tolerance=MOMENTUM_FLOOR_TOLERANCE
            )
        )
    return specs


def _sassha_hparams(method: str, k: int, rho: float, dtype: str, foreach: bool | None) -> dict[str, Any]:
    hparams: dict[str, Any] = {
        "lr": 1e-3,
        "rho": rho,
        "lazy_hessian": k,
        "hessian_method": method,
        "foreach": foreach,
    }
    if method == "finite_difference" and dtype == "bf16":
        hparams["fd_step"] = 2.5e-2  # bf16 autocast with fp32 parameters (README)
    return hparams


def _label(method: str) -> str:
    return "exact" if method == "exact" else "FD central"


def measure(
    *,
    model: str = "tiny",
    device: str = "cpu",
    dtype: str = "fp32",
    batch_size: int | None = None,
    seq_len: int | None = None,
    rounds: int = 7,
    steps_per_round: int | None = None,
    ks: tuple[int, ...] = (1, 10),
    methods: tuple[str, ...] = ("exact", "finite_difference"),
    foreach: bool | None = None,
    attn: str = "eager",
    n_batches: int = 4,
    verbose: bool = True,
) -> dict[str, Any]:
    """Time every contestant; returns the raw per-round times and the summary rows."""
    if attn != "eager" and "exact" in methods:
        raise ValueError(
            f"attn={attn!r} has no double backward, so exact Hessian-vector products fail under it: "
            "use attn='eager', or time finite differences only (--hessian finite_difference)."
        )
    dev = resolve_device(device)
    default_batch, default_seq = _DEFAULT_SHAPE[model]
    batch_size = batch_size or default_batch
    seq_len = seq_len or default_seq
    steps_per_round = steps_per_round or max(ks)
    if any(steps_per_round % k for k in ks):
        raise ValueError(f"steps_per_round={steps_per_round} must be a multiple of every k in {ks}.")
    base = build_lm(model, seed=0, device=dev, attn_implementation=attn)
    vocab = base.config.vocab_size
    batches = random_token_batches(n_batches, batch_size, seq_len, vocab, device=dev, seed=1)

    def loss_fn(net: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with autocast_context(dev, dtype):
            return net(input_ids=ids, labels=ids).loss

    contestants: list[Contestant] = []
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for spec in _specs(list(ks), list(methods), dtype, foreach):
        net = copy.deepcopy(base)
        opt = _build_optimizer(spec.optimizer, net.parameters(), **spec.hparams)
        optimizers[spec.name] = opt
        contestants.append(Contestant(spec.name, _stepper(net, opt, batches, loss_fn)))

    ref = copy.deepcopy(base)
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(2)
    probe = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in ref_params]
    cursor = {"i": 0}

    def next_batch() -> torch.Tensor:
        cursor["i"] += 1
        return batches[cursor["i"] % len(batches)]

    def fwd_bwd(n: int) -> None:
        for _ in range(n):
            ref.zero_grad(set_to_none=True)
            loss_fn(ref, next_batch()).backward()

    def exact_pass(n: int) -> None:
        for _ in range(n):
            ref.zero_grad(set_to_none=True)
            loss = loss_fn(ref, next_batch())
            grads = torch.autograd.grad(loss, ref_params, create_graph=True)
            exact_hvp(grads, ref_params, probe, retain_graph=False)

    def fd_passes(n: int) -> None:
        fwd_bwd(2 * n)

    refresh = {"i": 0}

    def probes(n: int) -> None:  # what a finite-difference refresh spends drawing its int8 probe
        for _ in range(n):
            refresh["i"] += 1
            ranges = [
                (probe_key(0, refresh["i"], index, 0), p.numel(), 0) for index, p in enumerate(ref_params)
            ]
            rademacher_ranges(ranges, dtype=torch.int8, device=ref_params[0].device)

    contestants.append(Contestant("fwd+bwd", fwd_bwd))
    if "exact" in methods:
        contestants.append(Contestant(_EXACT_REF, exact_pass))
    if "finite_difference" in methods:
        contestants.append(Contestant(_FD_REF, fd_passes))
    contestants.append(Contestant(_PROBE_REF, probes))
    log = (lambda msg: print(f"[step-time] {msg}", file=sys.stderr, flush=True)) if verbose else None
    times = interleaved_times(
        contestants, rounds=rounds, steps_per_round=steps_per_round, device=dev, progress=log
    )
    skipped = {name: opt.skipped_steps for name, opt in optimizers.items() if hasattr(opt, "skipped_steps")}
    rows = _summarise(times, _specs(list(ks), list(methods), dtype, foreach))
    return {
        "machine": machine_description(dev),
        "model": model,
        "n_params": count_parameters(base),
        "device": dev.type,
        "dtype": dtype,
        "attn": attn,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "foreach": foreach,
        "times": times,
        "rows": rows,
        "c_exact": median(_per_round(times, _EXACT_REF, "fwd+bwd")) - 1.0 if _EXACT_REF in times else None,
        "c_fd": median(_per_round(times, _FD_REF, "fwd+bwd")) if _FD_REF in times else None,
        "skipped_steps": skipped,
    }


def _stepper(net, opt, batches, loss_fn):
    cursor = {"i": 0}

    def run(n: int) -> None:
        for _ in range(n):
            ids = batches[cursor["i"] % len(batches)]
            cursor["i"] += 1
            train_step(opt, lambda ids=ids: loss_fn(net, ids))

    return run


def _per_round(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    return [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]


def _summarise(times: dict[str, list[float]], specs: list[_Spec]) -> list[dict[str, Any]]:
    fb = times["fwd+bwd"]
    rows = []
    for spec in specs:
        own = times[spec.name]
        if spec.optimizer == "adamw":
            floor_passes = [1.0] * len(fb)
        elif spec.optimizer == "sam-adamw":
            floor_passes = [2.0] * len(fb)
        else:
            hessian = times[_EXACT_REF if spec.method == "exact" else _FD_REF]
            extra = [(h / f - 1.0) if spec.method == "exact" else h / f for h, f in zip(hessian, fb)]
            floor_passes = [(1.0 if spec.one_pass else 2.0) + c / spec.k for c in extra]
        rows.append(
            {
                "name": spec.name,
                "ms": 1e3 * median(own),
                "vs_adamw": median(_per_round(times, spec.name, "AdamW")),
                "floor_passes": median(floor_passes),
                "floor_vs_adamw": median([p * f / a for p, f, a in zip(floor_passes, fb, times["AdamW"])]),
                "vs_floor": median([t / (p * f) for t, p, f in zip(own, floor_passes, fb)]),
                "sassha": spec.optimizer == "sassha",
                "tolerance": spec.tolerance,
            }
        )
    return rows


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    table = format_table(
        ["optimizer", "ms/step", "x AdamW", "floor (fwd+bwd)", "floor x AdamW", "x floor", "target"],
        [
            [
                r["name"],
                r["ms"],
                r["vs_adamw"],
                r["floor_passes"],
                r["floor_vs_adamw"],
                r["vs_floor"],
                (f"{'met' if r['vs_floor'] <= r['tolerance'] else 'missed'} (<= {r['tolerance']})")
                if r["sassha"]
                else "",
            ]
            for r in rows
        ],
    )
    t = result["times"]
    refs = ", ".join(
        f"{name} {1e3 * median(t[name]):.3g} ms" for name in ("fwd+bwd", _EXACT_REF) if name in t
    )
    probe_ms = 1e3 * median(t[_PROBE_REF])
    probe_passes = median(_per_round(t, _PROBE_REF, "fwd+bwd"))
    constants = []
    if result["c_exact"] is not None:
        constants.append(f"c_exact = {result['c_exact']:.3g} (extra fwd+bwd of an exact HVP pass)")
    if result["c_fd"] is not None:
        constants.append(f"c_fd = {result['c_fd']:.3g} (central FD passes)")
    lines = [
        f"step-time: {result['model']} GPT-2 ({result['n_params']:,} parameters), batch "
        f"{result['batch_size']}x{result['seq_len']}, {result['dtype']}, {result['attn']} attention, "
        f"{result['device']} "
        f"({result['machine']}); {result['rounds']} interleaved rounds of {result['steps_per_round']} steps, "
        "medians",
        "",
        table,
        "",
        f"passes: {refs}; " + ", ".join(constants),
        f"probe generation (counter-based Rademacher, every parameter): {probe_ms:.3g} ms per Hessian "
        f"refresh = {probe_passes:.2g} fwd+bwd; it is part of the overhead above the floor",
        f"target: SASSHA within {FLOOR_TOLERANCE - 1:.0%} of its floor (x floor <= {FLOOR_TOLERANCE}), "
        f"M-SASSHA within {MOMENTUM_FLOOR_TOLERANCE - 1:.0%}; "
        "floor = (2 + c/k) fwd+bwd, (1 + c/k) for SASSHA ρ=0 and M-SASSHA (one pass per step)",
    ]
    bad = {k: v for k, v in result["skipped_steps"].items() if v}
    if bad:
        lines.append(f"WARNING: SASSHA skipped non-finite steps during timing: {bad}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="tiny", choices=MODEL_SIZES)
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="bf16: autocast, fp32 parameters")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (every model)")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="default 64 (tiny), 128 (small), 512 (gpt2-small)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=None, help="default: the largest k")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10], help="lazy Hessian intervals")
    parser.add_argument(
        "--hessian",
        nargs="+",
        default=["exact", "finite_difference"],
        choices=["exact", "finite_difference"],
    )
    parser.add_argument(
        "--attn",
        default="eager",
        choices=["eager", "sdpa"],
        help="attention kernel; sdpa (torch's fused kernels) has no double backward: FD only",
    )
    parser.add_argument(
        "--foreach",
        default="auto",
        choices=["auto", "on", "off"],
        help="foreach kernels for all optimizers (auto: torch's and SASSHA's defaults)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = measure(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        ks=tuple(args.k),
        methods=tuple(args.hessian),
        foreach={"auto": None, "on": True, "off": False}[args.foreach],
        attn=args.attn,
    )
    print(report(result))
    return result
