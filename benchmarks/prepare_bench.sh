#!/usr/bin/env bash
# Sets up .bench/ (git-ignored) for the GPU scripts: the reference harness from ../shared/bench and
# the three reference files it times, taken from a copy of MeiGen-AI/MultiTalk (a checkout, or a
# bare git directory such as the one the `fetch` tool gives). Never committed: .bench/ is ignored.
#
#   bash benchmarks/prepare_bench.sh /path/to/MultiTalk      # a checkout or a git directory
set -euo pipefail
cd "$(dirname "$0")/.."
source_dir=${1:?"usage: $0 MULTITALK_CHECKOUT_OR_GIT_DIR"}
files=(wan/modules/multitalk_model.py wan/modules/attention.py wan/utils/multitalk_utils.py)
mkdir -p .bench/upstream/wan/modules .bench/upstream/wan/utils
cp ../shared/bench/*.py .bench/
for f in "${files[@]}"; do
  if [ -f "$source_dir/$f" ]; then
    cp "$source_dir/$f" ".bench/upstream/$f"
  else
    git --git-dir="$source_dir" show "HEAD:$f" > ".bench/upstream/$f"
  fi
done
touch .bench/upstream/wan/__init__.py .bench/upstream/wan/modules/__init__.py .bench/upstream/wan/utils/__init__.py
echo ".bench ready: $(ls .bench | tr '\n' ' ')"
