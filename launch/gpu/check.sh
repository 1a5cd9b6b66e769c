#!/usr/bin/env bash
# The GPU check: every CUDA-specific claim of sassha_dist, in one run of under 8 minutes.
#
#   bash launch/gpu/check.sh --out results/gpu                      # on a machine with a GPU
#   bash launch/gpu/check.sh --out results/gpu --wheels build/gpu-wheels   # offline: install these first
#   bash launch/gpu/check.sh --out /tmp/plan --dry-run              # print the stages, run nothing
#   bash launch/gpu/check.sh --out /tmp/cpu --allow-cpu             # no GPU: the same stages on the CPU
#
# Stages, each under its own `timeout` (the budgets sum to 450 s, so a rerun still fits a
# 15-minute device lease):
#   install      pip install --no-index --no-deps from --wheels (build_wheels.sh's MANIFEST.txt);
#                torch, transformers and accelerate are never touched: the machine's own are used
#   pytest       python -m pytest -m cuda tests/test_cuda.py (device vs CPU, kernels, replay, resume, bf16)
#   engines      launch/gpu/engines.py: W = 1 DDP, FSDP2, FSDP1, ZeRO-2/3, DCP vs one device (NCCL)
#   step-time    GPT-2 small (124M), bf16 autocast: SASSHA, M-SASSHA, AdamW vs the pass floor
#   kernel       the update kernel at GPT-2 small's full size vs torch's AdamW (foreach, fused)
#   memory-comm  W = 1 state, peak memory (CUDA's allocator statistics) and traffic per engine
#   main-job     accelerate launch (multi_gpu.yaml, 1 process) of run_clm.py --optim sassha
# Every stage runs even when an earlier one failed; each writes <out>/<stage>.log, the summary
# goes to <out>/summary.txt (stage, status, seconds), and the exit status is 1 if any failed.
# Record the numbers in docs/benchmarks.md and docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/../.."

out="" wheels="" dry_run=0 allow_cpu=0
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="${2:?--out needs a folder}"; shift 2 ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --allow-cpu) allow_cpu=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "check.sh: unknown argument '$1'." >&2; usage >&2; exit 2 ;;
    esac
done
if [[ -z "$out" ]]; then
    echo "check.sh: --out FOLDER is required (logs and summary.txt go there)." >&2
    exit 2
fi
if [[ -n "$wheels" ]] && ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "check.sh: no wheels in '$wheels'. Build them with: bash launch/gpu/build_wheels.sh" >&2
    exit 2
fi

device=cuda
if [[ $allow_cpu == 1 ]]; then
    device=cpu
fi

# name|budget seconds|command. On --allow-cpu the same stages run on the CPU at smaller sizes.
stages=()
if [[ -n "$wheels" ]]; then
    stages+=("install|45|python -m pip install --no-index --no-deps --find-links '$wheels' -r '$wheels/MANIFEST.txt'")
fi
if [[ $device == cuda ]]; then
    stages+=(
        "pytest|60|python -m pytest -q -m cuda tests/test_cuda.py"
        "engines|75|python launch/gpu/engines.py --device cuda --out '$out/engines'"
        "step-time|120|python -m sassha_dist.bench step-time --device cuda --model gpt2-small --dtype bf16 --hessian finite_difference --k 10 --rounds 5 --json '$out/step_time.json'"
        "kernel|30|python -m sassha_dist.bench kernel --device cuda --json '$out/kernel.json'"
        "memory-comm|60|python -m sassha_dist.bench memory-comm --device cuda --world-sizes 1 --json '$out/memory_comm.json'"
        "main-job|60|accelerate launch -q --config_file launch/accelerate/multi_gpu.yaml --num_processes 1 integrations/run_clm.py --optim sassha --output_dir '$out/clm'"
    )
else
    stages+=(
        "pytest|60|SASSHA_CUDA_TEST_DEVICE=cpu python -m pytest -q -m cuda tests/test_cuda.py"
        "engines|75|python launch/gpu/engines.py --device cpu --out '$out/engines'"
        "step-time|120|python -m sassha_dist.bench step-time --threads 1 --rounds 1 --k 10 --batch-size 2 --seq-len 16 --json '$out/step_time.json'"
        "kernel|30|python -m sassha_dist.bench kernel --numel 20000 --rounds 1 --json '$out/kernel.json'"
        "memory-comm|60|python -m sassha_dist.bench memory-comm --quick --engines ddp --world-sizes 1 --json '$out/memory_comm.json'"
        "main-job|60|accelerate launch -q --config_file launch/accelerate/cpu.yaml integrations/run_clm.py --optim sassha --max_steps 5 --output_dir '$out/clm'"
    )
fi

if [[ $dry_run == 1 ]]; then
    echo "check.sh: dry run on $device; stages (budget in seconds, command):"
    total=0
    for stage in "${stages[@]}"; do
        IFS='|' read -r name budget command <<<"$stage"
        printf '  %-12s %4ss  %s\n' "$name" "$budget" "$command"
        total=$((total + budget))
    done
    echo "  total budget ${total}s"
    exit 0
fi

if [[ $device == cuda ]] && ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "check.sh: no CUDA device (torch.cuda.is_available() is False). Run it on a GPU machine," \
        "or pass --allow-cpu to run the same stages on the CPU." >&2
    exit 3
fi

mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
{
    echo "# launch/gpu/check.sh on $device, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} >"$summary"
failed=0
for stage in "${stages[@]}"; do
    IFS='|' read -r name budget command <<<"$stage"
    echo "check.sh: $name (budget ${budget}s)" >&2
    start=$SECONDS
    timeout --kill-after=10 "$budget" bash -c "$command" >"$out/$name.log" 2>&1
    rc=$?
    seconds=$((SECONDS - start))
    case $rc in
        0) status=passed ;;
        124|137) status="timed out after ${budget}s"; failed=1 ;;
        *) status="failed (exit $rc)"; failed=1 ;;
    esac
    printf '%-12s %-26s %4ss\n' "$name" "$status" "$seconds" | tee -a "$summary" >&2
done
echo "check.sh: summary in $summary" >&2
exit $failed
