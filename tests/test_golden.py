"""Golden trajectories: every engine reproduces the committed runs of ``tests/golden/`` bit for bit.

The runs (``tests/golden/runs.py``) are short and fully deterministic: fixed models, batches,
seeds and probe streams, one intra-op thread, gloo ranks. Each case's final parameters, per-step
losses, m and D and the counters must be ``torch.equal`` to its ``tests/golden/<case>.pt``. A
failure names the case and the first differing tensor. A change of behaviour is re-recorded with
``python -m tests.golden.record`` only when it is intended (tests/golden/README.md).
"""

from __future__ import annotations

import pytest

from tests.golden import runs

_LAUNCHED: dict[str, dict[str, dict]] = {}


def _results(launch: str) -> dict[str, dict]:
    """All cases of ``launch``, run once per session (a launch runs its cases in a fixed order)."""
    if not runs.available(launch):
        pytest.skip(f"{runs.ENGINE_MODULE[launch]} is not installed")
    if launch not in _LAUNCHED:
        _LAUNCHED[launch] = runs.run_launch(launch)
    return _LAUNCHED[launch]


@pytest.mark.parametrize("name", list(runs.CASES))
def test_golden(name):
    case = runs.CASES[name]
    assert runs.path_of(name).exists(), (
        f"{name}: no golden file; record it with python -m tests.golden.record"
    )
    golden = runs.load(name)
    actual = _results(case.launch)[name]
    difference = runs.first_difference(golden["payload"], actual, "payload")
    if difference is not None:
        recorded, now = golden["environment"], runs.environment()
        changed = {
            k: (recorded.get(k), now.get(k))
            for k in recorded.keys() | now.keys()
            if recorded.get(k) != now.get(k)
        }
        note = f" (environment changed since recording: {changed})" if changed else ""
        pytest.fail(f"case {name!r} left its golden trajectory: {difference}{note}", pytrace=False)


def test_every_golden_file_has_a_case():
    recorded = {path.stem for path in runs.GOLDEN_DIR.glob("*.pt")}
    assert recorded == set(runs.CASES), f"files without a case: {sorted(recorded - set(runs.CASES))}"
