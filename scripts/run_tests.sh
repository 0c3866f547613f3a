#!/usr/bin/env bash
# The test command (README, .ci/run): sets up ./.venv if needed, then runs the CPU suite. Triton kernels run
# on the CPU through TRITON_INTERPRET=1 (tests/conftest.py). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
exec "$PYTHON" -m pytest -q "$@"
