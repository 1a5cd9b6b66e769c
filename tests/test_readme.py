"""The README's quick start runs as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_block() -> str:
    text = README.read_text()
    match = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "README lost its quick-start block"
    return match.group(1)


def test_quickstart_runs_and_reduces_the_loss(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(_quickstart_block())
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) == 5
    assert losses[-1] < losses[0]
    assert "Hessian refreshes: 5" in result.stdout
