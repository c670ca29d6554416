#!/usr/bin/env bash
# Quick start 2: create the environment if needed and run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HANT_VENV:-$ROOT/.venv}"  # the same default as setup.sh
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q "$@"
