#!/usr/bin/env bash
# Issue #4's headline table in one command on one GPU (under 10 minutes on an H100): the floor and
# the reference MultiTalk step measured in the same run, talkgen's compiled DiT step in bf16 and with
# fp8 GEMMs, the 4-step distilled clip end to end (fp8, resident) and in the smallest tier
# (stream-blocks, 12 GiB budget, bf16), then the fp8 step with the 8-bit attention and the mp4
# encode's threading (CPU). The whole script took 456 s on 2026-12-07 (its third run). Each
# step runs in its own process under its own time limit and an overall deadline; a failing step
# does not stop the others. Logs and JSON under $OUT.
#
#   bash benchmarks/run_gpu_table.sh   # carried: .whl/ .whl_ao/ (benchmarks/fetch_gpu_wheels.sh) and .bench/
#                                      # (benchmarks/prepare_bench.sh: ../shared/bench + the reference files)
source "$(dirname "$0")/gpu_common.sh"

step floor 60 python3 .bench/floor.py 81 448 896
step reference 110 env UPSTREAM_DIR=.bench/upstream python3 .bench/reference_step.py --steps 1 --humans 1
step dit_bf16 180 python3 benchmarks/bench_dit.py --people 1 --compile --no-batched --unshared
step dit_fp8 140 python3 benchmarks/bench_dit.py --people 1 --compile --no-batched --fp8
step clip_stream12 150 python3 benchmarks/bench_clip.py --steps 4 --text-scale 1 --audio-scale 2 --shift 2 \
  --memory stream-blocks --vram-budget 12
step clip_fp8 130 python3 benchmarks/bench_clip.py --steps 4 --text-scale 1 --audio-scale 2 --shift 2 --fp8
# Last, skipped when the deadline is near: the fp8 step with the opt-in 8-bit attention kernel as well.
step dit_fp8_attention 110 env TALKGEN_ATTENTION=gluon-fp8 python3 benchmarks/bench_dit.py --people 1 --compile \
  --no-batched --fp8 --tag _fp8attn
# CPU only (~25 s): the mp4 encode with x264 frame threads against slice threads on this host's cores
step mp4_threads 60 python3 benchmarks/bench_mp4.py

for f in "$OUT"/*.json; do echo "== $(basename "$f")"; cat "$f"; echo; done > "$OUT/results.txt"
python3 benchmarks/table.py "$OUT" | tee "$OUT/table.md"
cat "$OUT/steps.txt"
echo "total ${SECONDS}s"
