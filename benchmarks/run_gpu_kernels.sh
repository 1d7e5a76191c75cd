#!/usr/bin/env bash
# The kernels' tables in one command on one GPU (issue #10's, about 7 minutes on an H100, then ~3 for
# the LayerNorm A/B; a step the deadline reaches is skipped): the attention kernels'
# GPU check, then the ping-pong Gluon variants (bf16: correctness, then speed against SDPA in the
# same process), every 8-bit one (the same plus the tl 8-bit kernel) and the tl kernels against
# SDPA, at the 480p and 720p token counts, with the fused LayerNorm kernel (check, timing, a 10-block
# DiT A/B) before the tl kernels. Each step in its own process under its own time limit and the overall
# deadline; logs and JSON under $OUT. Its steps ran separately on 2026-12-06 (check_attention 56 s,
# two bf16 variants ~70 s, two 8-bit ones ~40 s; check_layer_norm 25 s, a 10-block DiT ~35 s), the
# script as a whole not yet.
#
#   bash benchmarks/run_gpu_kernels.sh   # carried: .whl/ and .whl_ao/ (benchmarks/fetch_gpu_wheels.sh)
source "$(dirname "$0")/gpu_common.sh"

step check_attention 130 python3 benchmarks/check_attention.py
# the FA3-loop / ping-pong variants (indices 0-5 of VARIANTS, ppns-lr the default); --all or no --variants for the rest
step gluon_bf16 200 python3 benchmarks/bench_attention_gluon.py --variants 0 1 2 3 4 5
# the 8-bit progression: mbarrier / named hand-over, ppns, + lazy rescale, + key-permuted P (the gluon-fp8
# default) and its lr1.5-p7 sibling (~20 s each)
step gluon_fp8 170 python3 benchmarks/bench_attention_gluon.py --fp8 --variants 0 3 4 5 7 8
# The fused residual add + LayerNorm kernel: GPU check and timing alone, then the 10-block DiT with
# Inductor's kernels and with it, in that order (~45 s each)
step layer_norm 90 python3 benchmarks/check_layer_norm.py
step dit_L10_torch_norms 90 python3 benchmarks/bench_dit.py --people 1 --compile --no-batched --layers 10 --reps 5 \
  --torch-norms --tag _L10_torch_norms
step dit_L10_fused_norms 90 python3 benchmarks/bench_dit.py --people 1 --compile --no-batched --layers 10 --reps 5 \
  --tag _L10_fused_norms
step triton_kernels 90 python3 benchmarks/bench_attention.py

grep -E "^(ok|FAIL)" "$OUT/check_attention.log" | cut -c1-4 | sort | uniq -c
for name in gluon_bf16 gluon_fp8; do grep -E "^(variant|ws-|inline-|fp8-|  baselines)" "$OUT/$name.log"; done
tail -n 20 "$OUT/triton_kernels.log"
grep -E "^(ok|FAIL)|Inductor" "$OUT/layer_norm.log"
grep -ho '"nfe_all": \[[^]]*\]' "$OUT/dit_L10_torch_norms.log" "$OUT/dit_L10_fused_norms.log"
cat "$OUT/steps.txt"
echo "total ${SECONDS}s"
