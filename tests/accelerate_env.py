"""What ``accelerate launch --config_file <yaml>`` hands its processes, without starting any."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch_env(config: str | Path) -> dict[str, str]:
    """The environment accelerate's launcher builds for each process from ``config`` (a multi-process one)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(ROOT / config), "--main_process_port", "0", "script.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def fsdp_env(config: str | Path) -> dict[str, str]:
    """The FSDP part of :func:`launch_env`: ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables."""
    return {
        k: v for k, v in launch_env(config).items() if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")
    }
