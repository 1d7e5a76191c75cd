#!/usr/bin/env bash
# Create .venv and install talkgen with its test extras. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Machines of this project carry a CPU torch wheel on disk; take it rather than a multi-GB
  # CUDA build. Elsewhere pip resolves torch from pyproject's range as usual.
  wheel=$(ls /opt/wheels/torch-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ]; then
    version=$(basename "$wheel" | cut -d- -f2)
    "${PIP[@]}" install "torch==${version%%+*}"
  fi
fi
"${PIP[@]}" install -e ".[${TALKGEN_EXTRAS:-service,test,deploy}]"
