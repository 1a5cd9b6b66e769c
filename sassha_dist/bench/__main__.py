"""``python -m sassha_dist.bench <subcommand> [options]``; see :mod:`sassha_dist.bench`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "step-time": ("step_time", "SASSHA step time vs AdamW and SAM-AdamW, and the floor of its passes"),
    "kernel": ("kernel", "the update kernel alone vs torch.optim.AdamW (foreach, for-loop, fused)"),
    "cost-model": ("cost_model", "memory, communication and passes per step under DDP, FSDP2, ZeRO 1/2/3"),
    "memory-comm": (
        "memory_comm",
        "measured state, peak memory, collective bytes per rank: DDP, FSDP2, ZeRO 1/2/3 at W = 1, 2, 4",
    ),
    "quality-lm": ("quality_lm", "validation loss of a tiny GPT on a stdlib-docstring corpus"),
    "quality-classifier": ("quality_classifier", "test accuracy and sharpness of a small classifier"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sassha_dist.bench",
        description="Benchmarks and paper-claim checks for SASSHA (docs/benchmarks.md, docs/cost_model.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="subcommand")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"sassha_dist.bench.{module_name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or "").split("\n\n")[0])
        module.add_arguments(p)
        p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
        p.add_argument(
            "--threads",
            type=int,
            default=None,
            help="torch intra-op CPU threads for this run (default: torch's). On a shared, oversubscribed "
            "machine 1 is far less noisy: spinning threads wait for each other",
        )
        p.set_defaults(module=module)
        _show_defaults(p)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each option's default to its help, so that ``--help`` shows it.

    Options whose default is ``None`` or ``False`` (a flag) are left as they are; where ``None``
    stands for a computed value, their help says which.
    """
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS:
            continue
        if action.help == argparse.SUPPRESS or "%(default)" in (action.help or ""):
            continue
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        shown = shown.replace("%", "%%")
        action.help = f"{action.help} (default: {shown})" if action.help else f"default: {shown}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = args.module.run(args)
    finally:
        torch.set_num_threads(threads)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
