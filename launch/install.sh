#!/usr/bin/env bash
# Install sassha_dist and its extras without letting pip choose a torch build.
#
#   bash launch/install.sh                            # transformers/accelerate, deepspeed, dev tools
#   SASSHA_EXTRAS=transformers bash launch/install.sh
#
# A torch that is already installed (for example your CUDA build) is kept.
# Without one, torch==2.13.0 is installed first: on a CPU machine pip takes the
# CPU wheel, where an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${SASSHA_EXTRAS:-transformers,deepspeed,dev}"
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install "torch==2.13.0"
fi
python -m pip install -e ".[${extras}]"
