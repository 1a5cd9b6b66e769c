#!/usr/bin/env bash
# Single-node FSDP2 (fully_shard).  Usage: bash launch/torchrun/fsdp2.sh [train.py args]
set -euo pipefail
nproc="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 2))')}"
exec torchrun --standalone --nproc_per_node "$nproc" "$(dirname "$0")/train.py" --engine fsdp2 "$@"
