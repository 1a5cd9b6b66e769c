"""The update kernel alone: ``sassha_update`` against ``torch.optim.AdamW`` on the same tensors.

The parameters are GPT-2 small's 148 tensors (124M elements) or, with
``--numel``, the same 148 tensors scaled down in proportion (each at least one
element), so the per-tensor overhead of a for-loop stays realistic. Each
contestant updates its own copy of the parameters, with fixed gradients, in
interleaved rounds (:func:`~sassha_dist.bench.common.interleaved_times`).

Byte model (the least traffic an update can have, fp32, ``4 * numel`` bytes a tensor):

* SASSHA reads ``p, g, m, D`` and writes ``p, m``: 6 tensors, 24 bytes an element
  (``D`` only moves on Hessian steps, in a separate kernel, not timed here);
* AdamW reads ``p, g, m, v`` and writes ``p, m, v``: 7 tensors, 28 bytes an element.

``GB/s`` is that model's bytes over the measured time: the effective
bandwidth, not a hardware counter. The target is SASSHA's foreach kernel within
1.2x of AdamW's foreach kernel.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from sassha_dist.bench.common import (
    Contestant,
    format_table,
    interleaved_times,
    machine_description,
    median,
    resolve_device,
)
from sassha_dist.functional import UpdateHyperparameters, sassha_update

__all__ = ["KERNEL_TOLERANCE", "add_arguments", "gpt2_small_shapes", "measure", "run"]

#: The target: SASSHA's foreach update within 1.2x of AdamW's foreach update.
KERNEL_TOLERANCE = 1.2
#: Tensors read plus written per element (see the module docstring).
SASSHA_TENSORS, ADAMW_TENSORS = 6, 7

_DEFAULT_NUMEL = {"cpu": 8_000_000, "cuda": None}


def gpt2_small_shapes(
    n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_positions: int = 1024
) -> list[tuple[int, ...]]:
    """The parameter shapes of ``GPT2LMHeadModel`` (GPT-2 small by default; the LM head is tied)."""
    shapes: list[tuple[int, ...]] = [(vocab, n_embd), (n_positions, n_embd)]
    for _ in range(n_layer):
        shapes += [
            (n_embd,),
            (n_embd,),  # ln_1
            (n_embd, 3 * n_embd),
            (3 * n_embd,),  # attn.c_attn
            (n_embd, n_embd),
            (n_embd,),  # attn.c_proj
            (n_embd,),
            (n_embd,),  # ln_2
            (n_embd, 4 * n_embd),
            (4 * n_embd,),  # mlp.c_fc
            (4 * n_embd, n_embd),
            (n_embd,),  # mlp.c_proj
        ]
    shapes += [(n_embd,), (n_embd,)]  # ln_f
    return shapes


def _scaled_sizes(shapes: list[tuple[int, ...]], numel: int | None) -> list[int]:
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if numel is None:
        return sizes
    total = sum(sizes)
    return [max(1, round(s * numel / total)) for s in sizes]


def measure(
    *,
    device: str = "cpu",
    numel: int | None = -1,
    rounds: int = 9,
    steps_per_round: int = 5,
    verbose: bool = True,
) -> dict[str, Any]:
    """Time the update kernels; ``numel=-1`` picks the device's default (8M on CPU, full on CUDA)."""
    dev = resolve_device(device)
    if numel == -1:
        numel = _DEFAULT_NUMEL[dev.type]
    sizes = _scaled_sizes(gpt2_small_shapes(), numel)
    total = sum(sizes)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(dev) for s in sizes]
    grads = [torch.randn(s, generator=gen).mul_(1e-2).to(dev) for s in sizes]

    contestants: list[Contestant] = []
    hyper = UpdateHyperparameters(
        lr=1e-4,
        beta1=0.9,
        beta2=0.999,
        weight_decay=0.01,
        eps=1e-4,
        hessian_power=0.5,
        eps_placement="after_power",
        bias_correction="hessian_refreshes",
        weight_decay_mode="lr_scaled",
    )
    for foreach in (True, False):
        params = [t.clone() for t in init]
        momenta = [torch.zeros_like(t) for t in init]
        diags = [g.abs().add_(1e-3) for g in grads]  # a positive Hessian diagonal
        counter = {"step": 0}

        def sassha(n, params=params, momenta=momenta, diags=diags, counter=counter, foreach=foreach):
            for _ in range(n):
                counter["step"] += 1
                steps = [counter["step"]] * len(params)
                corrections = [hyper.hessian_correction(1, 1.0, 1.0)] * len(params)
                sassha_update(params, grads, momenta, diags, steps, corrections, hyper, foreach=foreach)

        contestants.append(Contestant(f"SASSHA {'foreach' if foreach else 'for-loop'}", sassha))

    variants = {"foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    if _fused_supported(dev):
        variants["fused"] = {"fused": True}
    for label, flags in variants.items():
        params = [t.clone() for t in init]
        for p, g in zip(params, grads):
            p.grad = g
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **flags)

        def adamw(n, opt=opt):
            for _ in range(n):
                opt.step()

        contestants.append(Contestant(f"AdamW {label}", adamw))

    log = (lambda msg: print(f"[kernel] {msg}", file=sys.stderr, flush=True)) if verbose else None
    times = interleaved_times(
        contestants, rounds=rounds, steps_per_round=steps_per_round, device=dev, progress=log
    )
    rows = []
    for c in contestants:
        tensors = SASSHA_TENSORS if c.name.startswith("SASSHA") else ADAMW_TENSORS
        bytes_per_step = tensors * 4 * total
        per_round = [a / b for a, b in zip(times[c.name], times["AdamW foreach"], strict=True)]
        rows.append(
            {
                "name": c.name,
                "ms": 1e3 * median(times[c.name]),
                "vs_adamw_foreach": median(per_round),
                "model_bytes": bytes_per_step,
                "gb_per_s": bytes_per_step / median(times[c.name]) / 1e9,
            }
        )
    return {
        "machine": machine_description(dev),
        "device": dev.type,
        "numel": total,
        "n_tensors": len(sizes),
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "fused_supported": "AdamW fused" in times,
        "times": times,
        "rows": rows,
    }


def _fused_supported(device: torch.device) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` runs on ``device`` (tried on a one-element tensor)."""
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.zeros(1, device=device)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError):
        return False
    return True


def report(result: dict[str, Any]) -> str:
    table = format_table(
        ["kernel", "ms/update", "x AdamW foreach", "model bytes (MB)", "GB/s (model)"],
        [
            [r["name"], r["ms"], r["vs_adamw_foreach"], r["model_bytes"] / 1e6, r["gb_per_s"]]
            for r in result["rows"]
        ],
    )
    ratio = next(r["vs_adamw_foreach"] for r in result["rows"] if r["name"] == "SASSHA foreach")
    fused = "" if result["fused_supported"] else " (AdamW fused: not supported on this device)"
    return "\n".join(
        [
            f"kernel: {result['numel']:,} fp32 elements in {result['n_tensors']} tensors (GPT-2 small's "
            f"shapes{'' if result['numel'] > 100_000_000 else ', scaled'}), {result['device']} "
            f"({result['machine']}); {result['rounds']} interleaved rounds of {result['steps_per_round']} "
            f"updates, medians{fused}",
            "",
            table,
            "",
            "bytes: SASSHA reads p, g, m, D and writes p, m (24 B/element); "
            "AdamW reads p, g, m, v and writes p, m, v (28 B/element)",
            f"target: SASSHA foreach within {KERNEL_TOLERANCE}x of AdamW foreach: {ratio:.3g}x, "
            f"{'met' if ratio <= KERNEL_TOLERANCE else 'missed'}",
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--numel",
        type=int,
        default=-1,
        help="total elements (GPT-2 small's 148 tensors scaled); default 8M on CPU, 124M (full) on CUDA; "
        "0 for full size",
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps-per-round", type=int, default=5)


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = measure(
        device=args.device,
        numel=None if args.numel == 0 else args.numel,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
    )
    print(report(result))
    return result
