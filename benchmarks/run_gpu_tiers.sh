#!/usr/bin/env bash
# Issue #4 on one GPU, in one command (about 8 minutes on an H100): fp8 quality, the memory tiers at
# full size (peak GPU, time per NFE against resident), the encoders and VAE under offload, the
# 4-step clip end to end with fp8, the TeaCache NFE count, host RSS while loading. Each check runs
# in its own process under its own time limit and an overall deadline; a failing check does not stop
# the others. Logs and JSON results under $OUT; the summary table is $OUT/summary.txt.
#
#   bash benchmarks/run_gpu_tiers.sh          # carried: .whl/ (diffusers, av, ...) and .whl_ao/ (torchao)
DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/gpu_common.sh"

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
