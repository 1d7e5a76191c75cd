#!/usr/bin/env bash
# Issue #4 on one GPU, in one command (about 8 minutes on an H100): fp8 quality, the memory tiers at
# full size (peak GPU, time per NFE against resident), the encoders and VAE under offload, the
# 4-step clip end to end with fp8, the TeaCache NFE count, host RSS while loading. Each check runs
# in its own process under its own time limit and an overall deadline; a failing check does not stop
# the others. Logs and JSON results under $OUT; the summary table is $OUT/summary.txt.
#
#   bash benchmarks/run_gpu_tiers.sh          # carried: .whl/ (diffusers, av, ...) and .whl_ao/ (torchao)
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-benchmarks/results}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-570}  # seconds for the whole script
SECONDS=0

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl_ao/*.whl > "$OUT/install.log" 2>&1 || echo "wheel install failed (see install.log)"
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1 | tee "$OUT/versions.txt"

step() {  # step NAME LIMIT_S command...: run under min(LIMIT, time left), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 25 ]; then echo "[$SECONDS s] $name: skipped (deadline)" | tee -a "$OUT/steps.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[$SECONDS s] $name (limit ${limit}s)" | tee -a "$OUT/steps.txt"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$SECONDS s] $name: exit $rc" | tee -a "$OUT/steps.txt"
  tail -n 3 "$OUT/$name.log"
  return 0
}

# fp8 quality first: it also warms Inductor's cache for the fp8 block graph.
step fp8_check 110 python3 benchmarks/check_fp8.py --layers 4
step tier_resident 100 python3 benchmarks/check_tiers.py --tier resident
step tier_stream12 80 python3 benchmarks/check_tiers.py --tier stream-blocks --budget 12
step tier_fp8 80 python3 benchmarks/check_tiers.py --tier resident --fp8
step tier_fp8_attn8 70 env TALKGEN_ATTENTION=triton-fp8 python3 benchmarks/check_tiers.py --tier resident --fp8
step tier_stream12_fp8 70 python3 benchmarks/check_tiers.py --tier stream-blocks --budget 12 --fp8
step load_rss 75 bash -c "python3 benchmarks/check_load_rss.py --write /tmp/rss --layers 4 && \
  python3 benchmarks/check_load_rss.py --load /tmp/rss --device cpu && \
  python3 benchmarks/check_load_rss.py --load /tmp/rss --device cuda; rm -rf /tmp/rss"
step teacache 50 python3 benchmarks/check_teacache.py --layers 1
step clip_fp8 150 python3 benchmarks/bench_clip.py --steps 4 --text-scale 1 --audio-scale 2 --shift 2 --fp8
step encoders 80 python3 benchmarks/check_tiers.py --encoders
rm -rf /tmp/rss
python3 benchmarks/check_tiers.py --summary > "$OUT/summary.txt" 2>&1
for f in fp8_check clip_4steps_2nfe_fp8 teacache_full load_rss_cpu load_rss_cuda; do
  [ -f "$OUT/$f.json" ] && { echo "== $f"; cat "$OUT/$f.json"; echo; } >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
echo "total ${SECONDS}s"
