#!/usr/bin/env bash
# One GPU session's measurements, logs under $OUT. The floor and the reference step come from
# the harness in ../shared/bench and the fetched MeiGen-AI/MultiTalk files, carried in .bench/
# (git-ignored), so they are measured in the same run as talkgen.
#   bash benchmarks/run_gpu.sh base     # floor, reference step, talkgen eager
#   bash benchmarks/run_gpu.sh compiled # talkgen compiled (1 and 2 speakers), bf16 vs fp32
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
case "${1:-base}" in
  base)
    python3 .bench/floor.py 81 448 896 2>&1 | tee "$OUT/floor.log"
    UPSTREAM_DIR=.bench/upstream python3 .bench/reference_step.py --steps 2 --humans 1 2>&1 | tee "$OUT/reference.log"
    python3 benchmarks/bench_dit.py --people 1 2>&1 | tee "$OUT/eager.log"
    ;;
  compiled)
    python3 benchmarks/bench_dit.py --people 1 --compile 2>&1 | tee "$OUT/compiled1.log"
    python3 benchmarks/bench_dit.py --people 2 --compile 2>&1 | tee "$OUT/compiled2.log"
    python3 benchmarks/check_bf16.py --layers 4 2>&1 | tee "$OUT/bf16.log"
    ;;
esac
