"""Record the golden trajectories: ``python -m tests.golden.record [CASE ...]`` from the repository root.

Reruns every case of ``tests/golden/runs.py`` (or only the named ones) and writes
``tests/golden/<case>.pt``. ``--check`` compares with the committed files instead of writing them
(what ``tests/test_golden.py`` does). Re-record only for an intended behaviour change, and say so
in the commit message (tests/golden/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.golden import runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden.record", description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", help=f"cases to record (default: all): {', '.join(runs.CASES)}")
    parser.add_argument("--check", action="store_true", help="compare with the files, write nothing")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases) - set(runs.CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(runs.CASES)}")
    wanted = args.cases or list(runs.CASES)
    failures = 0
    for launch in runs.LAUNCHES:
        if not any(runs.CASES[name].launch == launch for name in wanted):
            continue
        if not runs.available(launch):
            print(f"{launch}: {runs.ENGINE_MODULE[launch]} is not installed", file=sys.stderr)
            failures += 1
            continue
        start = time.perf_counter()
        results = runs.run_launch(launch)  # a launch always runs all its cases, in order
        print(f"{launch}: {time.perf_counter() - start:.1f} s")
        for name in wanted:
            if name not in results:
                continue
            if args.check:
                difference = runs.first_difference(runs.load(name)["payload"], results[name], "payload")
                failures += difference is not None
                print(f"  {name}: {difference or 'identical'}")
            else:
                path = runs.save(name, results[name])
                print(f"  {name}: {path.relative_to(runs.REPO)} ({path.stat().st_size} bytes)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
