#!/usr/bin/env bash
# Single-node DDP: one process per GPU (or NPROC CPU processes).  Usage: bash launch/torchrun/ddp.sh [train.py args]
set -euo pipefail
nproc="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 2))')}"
exec torchrun --standalone --nproc_per_node "$nproc" "$(dirname "$0")/train.py" --engine ddp "$@"
