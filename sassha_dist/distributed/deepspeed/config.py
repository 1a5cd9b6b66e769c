"""check_config: the DeepSpeed settings SASSHA cannot run, refused with the fix."""

from __future__ import annotations

import copy
import json
import os
from typing import Any


def _load_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if not isinstance(config, dict):
        raise TypeError(
            f"Invalid DeepSpeed config of type {type(config).__name__}: pass a dict or a JSON path."
        )
    return copy.deepcopy(config)


def _enabled(block: Any) -> bool:
    return isinstance(block, dict) and bool(block.get("enabled", False))


def _offload_device(block: Any) -> str:
    if not isinstance(block, dict):
        return "none"
    return str(block.get("device", "none")).lower()


def check_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Validate a DeepSpeed config for SASSHA; return a copy with ``zero_allow_untested_optimizer`` set.

    Raises ``ValueError`` naming the fix for every setting that conflicts with
    SASSHA's two-pass step or with its checkpoints.
    """
    config = _load_config(config)
    problems = []
    if "optimizer" in config:
        problems.append(
            "the config has an 'optimizer' block: SASSHA is the client optimizer, so remove the block and "
            "pass optimizer=ZeroSassha(params, ...) to deepspeed.initialize (or use "
            "sassha_dist.distributed.deepspeed.initialize); with accelerate, pass a ZeroSassha to "
            "accelerator.prepare instead of accelerate's DummyOptim"
        )
    zero = config.get("zero_optimization")
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if stage not in (1, 2, 3):
        problems.append(
            f"zero_optimization.stage is {stage}: SasshaDeepSpeed needs ZeRO stage 1, 2 or 3 (set "
            '"zero_optimization": {"stage": 1|2|3}); without ZeRO use plain Sassha under DDP'
        )
    autocast = config.get("torch_autocast")
    autocast_dtype = str(autocast.get("dtype", "")).lower() if _enabled(autocast) else ""
    autocast_fp16 = autocast_dtype in ("fp16", "float16", "half", "torch.float16")
    if _enabled(config.get("fp16")) or autocast_fp16:
        problems.append(
            "fp16 is enabled: dynamic loss scaling would skip and rescale the passes of one step "
            'independently; use "bf16": {"enabled": true} (or fp32)'
        )
    if isinstance(zero, dict):
        for key in ("offload_optimizer", "offload_param"):
            device = _offload_device(zero.get(key))
            if device not in ("none", ""):
                problems.append(
                    f"zero_optimization.{key}.device is {device!r}: SASSHA reads and rewrites the "
                    "gradient and parameter partitions between passes, which offloaded (swapped) "
                    f"partitions do not allow; remove zero_optimization.{key}"
                )
        if zero.get("elastic_checkpoint", False):
            problems.append(
                "zero_optimization.elastic_checkpoint is true: elastic checkpoints keep only per-group "
                "tensor state and drop SASSHA's counters; set it to false"
            )
        if zero.get("zenflow"):
            problems.append("zero_optimization.zenflow is set: ZenFlow has its own update loop; remove it")
    precision = config.get("data_types", {}) if isinstance(config.get("data_types"), dict) else {}
    if (
        stage == 1
        and _enabled(config.get("bf16"))
        and str(precision.get("grad_accum_dtype", "")).lower() in ("fp32", "float32", "float")
    ):
        problems.append(
            "ZeRO stage 1 with bf16 and data_types.grad_accum_dtype=fp32 runs DeepSpeed's BF16_Optimizer, "
            "which SasshaDeepSpeed does not drive; drop grad_accum_dtype or use stage 2"
        )
    if config.get("managed_gradient_accumulation", True) is False:
        problems.append(
            "managed_gradient_accumulation is false: SasshaDeepSpeed sets the accumulation boundary of "
            "every pass itself; remove the setting"
        )
    if isinstance(config.get("checkpoint"), dict) and config["checkpoint"].get("load_universal", False):
        problems.append(
            "checkpoint.load_universal is true: DeepSpeed's universal checkpoints only carry Adam's "
            "state, not SASSHA's; resume from the original checkpoint"
        )
    pipeline_stages = config["pipeline"].get("stages", 1) if isinstance(config.get("pipeline"), dict) else 1
    if isinstance(pipeline_stages, int) and pipeline_stages > 1:
        problems.append("pipeline parallelism is not supported: SASSHA needs whole-model passes")
    if problems:
        raise ValueError("Invalid DeepSpeed config for SASSHA:\n  - " + "\n  - ".join(problems))
    config["zero_allow_untested_optimizer"] = True
    return config
