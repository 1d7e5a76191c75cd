#!/usr/bin/env bash
# The whole pipeline on the GPU with the tiny model (bf16, compiled blocks): a CUDA check of the
# code paths CI cannot run. Wheels for what the GPU image lacks travel in .whl/ (git-ignored).
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_cli/*.whl \
  $(ls .whl_ao/*.whl 2>/dev/null)  # torchao, when carried: then fp8 is on (auto)
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'PY'
import numpy as np, soundfile as sf
from PIL import Image
from talkgen.media.samples import sample_portrait, sample_speech
Image.fromarray(sample_portrait((480, 640))).save("/tmp/p.png")
sf.write("/tmp/s.wav", sample_speech(2.0), 16000)
sf.write("/tmp/s2.wav", sample_speech(1.0), 16000)
PY
python3 -m talkgen.cli generate --weights /tmp/tiny --model tiny --device cuda --image /tmp/p.png --audio /tmp/s.wav \
  --steps 4 --color-strength 0 --output "$OUT/tiny_cuda.mp4"
python3 -m talkgen.cli generate --weights /tmp/tiny --model tiny --device cuda --image /tmp/p.png --audio /tmp/s.wav \
  --audio2 /tmp/s2.wav --audio-type add --steps 2 --color-strength 0 --output "$OUT/tiny_cuda_duo.mp4"
# the smallest tier: DiT blocks streamed from pinned host memory, encoders offloaded, tiled VAE
python3 -m talkgen.cli generate --weights /tmp/tiny --model tiny --device cuda --image /tmp/p.png --audio /tmp/s.wav \
  --steps 2 --mode streaming --memory stream-blocks --vram-budget 0.001 --output "$OUT/tiny_cuda_stream.mp4"
python3 - <<'PY'
import av, os
for name in ("tiny_cuda.mp4", "tiny_cuda_duo.mp4", "tiny_cuda_stream.mp4"):
    with av.open(os.path.join(os.environ["OUT"], name)) as c:
        n = sum(1 for _ in c.decode(video=0))
    print(name, "frames", n)
PY
