#!/usr/bin/env bash
# The test suite on a busy machine: N CPU-burning processes run beside it while
# the whole suite runs once, then the distributed tests run R-1 more times
# (R runs of every distributed test in all). Every failure is listed at the end.
#
#   bash tests/stress.sh            # N = number of cores, R = 3
#   bash tests/stress.sh -n 2 -r 3 [-- extra pytest arguments]
#
# Run it from an installed environment (bash launch/install.sh). The distributed
# tests are the modules that start real ranks (run_ranks, torchrun, accelerate
# launch); CI runs the suite once on an idle machine and does not run this.
set -uo pipefail
cd "$(dirname "$0")/.."

burners=$(nproc)
repeats=3
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n) burners="$2"; shift 2 ;;
        -r) repeats="$2"; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: bash tests/stress.sh [-n BURNERS] [-r REPEATS] [-- PYTEST_ARGS]" >&2; exit 2 ;;
    esac
done
if ! [[ "$burners" =~ ^[0-9]+$ && "$repeats" =~ ^[1-9][0-9]*$ ]]; then
    echo "Invalid -n $burners / -r $repeats: BURNERS must be an int >= 0, REPEATS an int >= 1." >&2
    exit 2
fi

mapfile -t distributed < <(grep -l -E 'run_ranks\(|torchrun|accelerate launch|"launch"' tests/test_*.py)
logs=$(mktemp -d -t sassha-stress.XXXXXX)
pids=()
stop_burners() { [[ ${#pids[@]} -gt 0 ]] && kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; }
trap stop_burners EXIT
for _ in $(seq 1 "$burners"); do
    python -c 'while True: pass' &
    pids+=($!)
done
echo "stress: $burners burners, $repeats runs of ${#distributed[@]} distributed modules; logs in $logs"

status=0
run() {  # run NAME PYTEST_ARGS...
    local name=$1; shift
    local start=$SECONDS
    python -m pytest -q -p no:cacheprovider -rfE "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    echo "stress: $name rc=$rc in $((SECONDS - start)) s: $(tail -n 1 "$logs/$name.log")"
    grep -E '^(FAILED|ERROR) ' "$logs/$name.log" | sed "s/^/stress: $name: /"
    [[ $rc -eq 0 ]] || status=1
}
run suite "$@"
for r in $(seq 2 "$repeats"); do
    run "distributed_$r" "${distributed[@]}" "$@"
done
echo "stress: $([[ $status -eq 0 ]] && echo 'no failures' || echo 'FAILURES above')"
exit "$status"
