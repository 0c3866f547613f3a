"""scripts/setup_env.sh, which both README commands source: after the first set-up, every run is offline."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source(path_first=None):
    """Source setup_env.sh (test extra) with no package index reachable; returns (PYTHON it chose, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/simple")
    if path_first:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["bash", "-c", 'source scripts/setup_env.sh test && echo "PYTHON=$PYTHON"'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].removeprefix("PYTHON="), result.stderr


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="the suite runs outside ./.venv")
def test_a_set_up_checkout_needs_no_network():
    python, stderr = _source()
    assert "Setting up" not in stderr and "pip" not in stderr
    assert python in ("python3", str(ROOT / ".venv" / "bin" / "python"))


def test_a_python3_that_has_everything_is_used_as_it_is(tmp_path):
    """As on a GPU machine whose own python3 holds torch and the rest: no ./.venv is made."""
    wrapper = tmp_path / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # not a link: a venv is found by its path
    wrapper.chmod(0o755)
    python, stderr = _source(path_first=tmp_path)
    assert python == "python3"
    assert "Setting up" not in stderr
