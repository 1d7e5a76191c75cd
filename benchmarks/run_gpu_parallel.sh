#!/usr/bin/env bash
# Two GPUs of one host (the 2x H200 machine), one command: the fp8 quality guard on GPU 0, then the
# Ulysses sequence-parallel DiT against one GPU of the same machine (every exchange variant for one
# speaker, the default variants for two). Logs and JSON under $OUT.
#   bash benchmarks/run_gpu_parallel.sh        # carried: .whl/ and .whl_ao/ (torchao, for the fp8 check)
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-benchmarks/results} NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"
SECONDS=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl_ao/*.whl > "$OUT/install.log" 2>&1 || echo "wheel install failed (see install.log)"
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/check_fp8.py --layers 2 > "$OUT/fp8_check.log" 2>&1
tail -n 2 "$OUT/fp8_check.log"; echo "[$SECONDS s] fp8 check done"
timeout 300 torchrun --standalone --nproc_per_node=2 benchmarks/bench_parallel.py --compile --people 1 \
  > "$OUT/parallel_1p.log" 2>&1
tail -n 25 "$OUT/parallel_1p.log"; echo "[$SECONDS s] 1 speaker done"
left=$((570 - SECONDS))
[ "$left" -gt 60 ] && timeout "$left" torchrun --standalone --nproc_per_node=2 benchmarks/bench_parallel.py --compile \
  --people 2 --chunks 2 --skip-pipeline > "$OUT/parallel_2p.log" 2>&1
tail -n 15 "$OUT/parallel_2p.log"; echo "[$SECONDS s] 2 speakers done"
