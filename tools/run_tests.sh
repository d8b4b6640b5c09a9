#!/usr/bin/env bash
# Install (once) and run the test suite; extra arguments go to pytest (e.g. -k parity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
.venv/bin/python -m pytest -q tests "$@"
