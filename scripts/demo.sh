#!/usr/bin/env bash
# The bundled demo, from a fresh clone, in one command: offline, on a CPU or a GPU.
#   bash scripts/demo.sh                 # creates .venv and installs requirements.txt (skipped when .venv has them),
#                                        # then runs scripts/demo.py: every training stage on a generated mini-world,
#                                        # measured on held-out data (~19 min of training on 2 CPU cores)
#   bash scripts/demo.sh --seed 2        # any scripts/demo.py flag: --seed N, --quick, --fresh, --device cuda
# Set PYTHON to use another interpreter (with the requirements installed) instead of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if ! .venv/bin/python -c "import torch, transformers, tokenizers, matplotlib" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --disable-pip-version-check -r requirements.txt
  fi
  PYTHON=.venv/bin/python
fi

exec "$PYTHON" scripts/demo.py "$@"
