#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# UTF-8 everywhere (subprocess output holds progress-bar characters), whatever the locale.
export PYTHONUTF8=1 PYTHONIOENCODING=utf-8
exec .venv/bin/python -m pytest Testing -q "$@"
