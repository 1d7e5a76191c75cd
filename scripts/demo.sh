#!/usr/bin/env bash
# Install talkgen, then make a real mp4 with the tiny built-in model on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/talkgen demo "$@"
