#!/usr/bin/env bash
# Create .venv with pinned dependencies, install the engine (`hssl` command) and fetch the sample
# scans. Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
      PYTHON=$candidate; break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "error: no Python 3.10-3.12 found: install one (HSSLSegment needs 3.10, 3.11 or 3.12) or set PYTHON=" >&2
  exit 2
fi
stamp_input="$(cat scripts/requirements-ci.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if [ "$(cat .venv/.hssl-setup 2>/dev/null)" != "$stamp_input" ]; then
  echo "setup: installing torch 2.13.0 (CPU) and the pinned dependencies"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v WARNING || true
  # torch first: with 2.13.0 present, packages that ask for torch>=... install no other build.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v WARNING || true
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/requirements-ci.txt 2>&1 | grep -v WARNING || true
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 | grep -v WARNING || true
  .venv/bin/python -c "import torch, monai, SimpleITK, slicerio, hssl; print('setup: torch', torch.__version__, 'monai', monai.__version__, 'hssl', hssl.__version__)"
  echo "$stamp_input" > .venv/.hssl-setup
fi
echo "setup: sample scans (cached in $(.venv/bin/hssl data path))"
.venv/bin/hssl data fetch >/dev/null
echo "setup: done"
