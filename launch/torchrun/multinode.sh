#!/usr/bin/env bash
# Multi-node rendezvous: run this same command on every node.
#   NNODES=4 NPROC=8 MASTER_ADDR=node0 JOB_ID=run42 bash launch/torchrun/multinode.sh --engine fsdp2
# MASTER_ADDR is any one node reachable by all; c10d rendezvous assigns node ranks itself.
set -euo pipefail
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec torchrun \
    --nnodes "$NNODES" \
    --nproc_per_node "${NPROC:-8}" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
    --rdzv_id "${JOB_ID:-sassha}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    "$(dirname "$0")/train.py" "$@"
