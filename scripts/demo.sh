#!/usr/bin/env bash
# Set up, then animate the shared inputs (one and two characters) with a tiny random model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m fantasyportrait_core.cli demo --data "${DATA:-../shared/data}" --out outputs/demo "$@"
