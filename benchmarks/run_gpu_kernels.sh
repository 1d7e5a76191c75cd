#!/usr/bin/env bash
# Issue #10's table in one command on one GPU (about 7 minutes on an H100): the attention kernels'
# GPU check, then the ping-pong Gluon variants (bf16: correctness, then speed against SDPA in the
# same process), every 8-bit one (the same plus the tl 8-bit kernel) and the tl kernels against
# SDPA, at the 480p and 720p token counts. Each step in its own process under its own time limit and the overall
# deadline; logs and JSON under $OUT. Its steps ran separately on 2026-12-06 (check_attention 56 s,
# two bf16 variants ~70 s, two 8-bit ones ~40 s), the script as a whole not yet.
#
#   bash benchmarks/run_gpu_kernels.sh   # carried: .whl/ and .whl_ao/ (benchmarks/fetch_gpu_wheels.sh)
source "$(dirname "$0")/gpu_common.sh"

step check_attention 130 python3 benchmarks/check_attention.py
# the FA3-loop / ping-pong variants (indices 0-5 of VARIANTS, ppns-lr the default); --all or no --variants for the rest
step gluon_bf16 200 python3 benchmarks/bench_attention_gluon.py --variants 0 1 2 3 4 5
# the 8-bit progression: mbarrier / named hand-over, ppns, + lazy rescale, + key-permuted P (the gluon-fp8
# default) and its lr1.5-p7 sibling (~20 s each)
step gluon_fp8 170 python3 benchmarks/bench_attention_gluon.py --fp8 --variants 0 3 4 5 7 8
step triton_kernels 90 python3 benchmarks/bench_attention.py

grep -E "^(ok|FAIL)" "$OUT/check_attention.log" | cut -c1-4 | sort | uniq -c
for name in gluon_bf16 gluon_fp8; do grep -E "^(variant|ws-|inline-|fp8-|  baselines)" "$OUT/$name.log"; done
tail -n 20 "$OUT/triton_kernels.log"
cat "$OUT/steps.txt"
echo "total ${SECONDS}s"
