#!/usr/bin/env bash
# Quick start 1: create the environment and run the embedded default end to end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/hant" demo "$@"
