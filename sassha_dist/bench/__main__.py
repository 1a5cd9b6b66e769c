"""``python -m sassha_dist.bench <subcommand> [options]``; see :mod:`sassha_dist.bench`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "step-time": ("step_time", "SASSHA step time vs AdamW and SAM-AdamW, and the floor of its passes"),
    "kernel": ("kernel", "the update kernel alone vs torch.optim.AdamW (foreach, for-loop, fused)"),
    "cost-model": ("cost_model", "memory, communication and passes per step under DDP, FSDP2, ZeRO 1/2/3"),
    "quality-lm": ("quality_lm", "validation loss of a tiny GPT on a stdlib-docstring corpus"),
    "quality-classifier": ("quality_classifier", "test accuracy and sharpness of a small classifier"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sassha_dist.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="subcommand")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"sassha_dist.bench.{module_name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or "").split("\n\n")[0])
        module.add_arguments(p)
        p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
        p.set_defaults(module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = args.module.run(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
