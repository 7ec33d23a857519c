#!/usr/bin/env bash
# Set up (if needed) and run the demo on a real sample CT: 3 annotated slices of a lung tumour,
# fine-tune on the CPU, predict, Dice on the unannotated slices, a PNG overlay.
# Usage: bash scripts/demo.sh [hssl demo args, e.g. --case brain1 --annotated-slices 2]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hssl demo --out demo-output "$@"
