# Sourced by the GPU scripts (run_gpu_table.sh, run_gpu_tiers.sh): environment, the carried wheels
# (.whl/ and .whl_ao/ from benchmarks/fetch_gpu_wheels.sh), the GPU and versions on record, and
# `step`, which runs one check in its own process under a time limit and the script's deadline
# (SKIP_STEPS="name ..." skips steps by name; SAVE_TGZ=path packs $OUT into one archive after each step,
# so a call cut short still brings back every finished step's logs).
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-benchmarks/results}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-585}  # seconds for the whole script (a device call runs at most 600)
SECONDS=0

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl_ao/*.whl > "$OUT/install.log" 2>&1 || echo "wheel install failed (see install.log)"
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchao, triton; print('torch', torch.__version__, 'torchao', torchao.__version__, 'triton', triton.__version__)" \
  2>&1 | tail -1 | tee "$OUT/versions.txt"

step() {  # step NAME LIMIT_S command...: run under min(LIMIT, time left), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  case " ${SKIP_STEPS:-} " in *" $name "*) echo "[$SECONDS s] $name: skipped (SKIP_STEPS)" | tee -a "$OUT/steps.txt"; return;; esac
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 25 ]; then echo "[$SECONDS s] $name: skipped (deadline)" | tee -a "$OUT/steps.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[$SECONDS s] $name (limit ${limit}s)" | tee -a "$OUT/steps.txt"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$SECONDS s] $name: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/steps.txt"
  tail -n 2 "$OUT/$name.log"
  if [ -n "${SAVE_TGZ:-}" ]; then tar czf "$SAVE_TGZ" -C "$OUT" . ; fi
  return 0
}
