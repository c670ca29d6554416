#!/usr/bin/env bash
# Quick start 1: create the environment and run the embedded default end to end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HANT_VENV:-$ROOT/.venv}"  # the same default as setup.sh
"$ROOT/scripts/setup.sh"
exec "$VENV/bin/hant" demo "$@"
