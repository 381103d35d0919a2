#!/usr/bin/env bash
# One prepared run of the benches on a CUDA machine, for the minutes a GPU is at hand: NF4 on CUDA
# kernels against float (bench.chat_precision), the chat engine against transformers' generate at 1
# and 8 clients with 0, 1, 3 and 5 domains (bench.chat), ILF at DiT-XL/2 and PixArt scale in bf16 at
# batch 1 and 16 (bench.ilf_real_scale), image serving batched against sequential (bench.images), and
# a summary of each figure beside its bound (bench.gpu_report: decode at batch 1 against the memory
# bandwidth measured in the same run). Every bench writes JSON under $OUT; the summary is $OUT/gpu.json.
#
# It installs nothing: it runs in the environment `make venv` made (TORCH_SPEC names the CUDA build of
# torch, see the Makefile), or the python it is given. Without $ROOT it builds a micro zoo on the GPU
# first (the packaged chat base, five domains' stacks and the router, the digit image models and
# their ILF modules, a few training steps each): speed does not depend on how long stacks trained.
#
#   bench/gpu.sh                                   # CUDA, a micro zoo built in $OUT/zoo
#   ROOT=artifacts bench/gpu.sh                    # the benches on a built zoo
#   DEVICE=cpu QUICK=1 ROOT=... OUT=... bench/gpu.sh   # seconds, on tiny artifacts (the tests run this)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/bench/gpu}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
QUICK=${QUICK:-0}
IMAGE_MODEL=${IMAGE_MODEL:-digits-dit}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
started=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - started )) s)"; }

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: DEVICE=cpu runs the same on the CPU')"
  "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
fi

if [ -z "${ROOT:-}" ]; then
  ROOT=$OUT/zoo
  if [ ! -f "$ROOT/weights_manifest.yaml" ]; then
    step "micro zoo"
    "$PY" -m training --artifacts "$ROOT" zoo all --micro --device "$DEVICE"
    "$PY" -m training --artifacts "$ROOT" zoo chat --micro --domains chat code math medical reasoning --device "$DEVICE"
  fi
fi

if [ "$QUICK" = 1 ]; then
  precision=(--max-new-tokens 3 --window 32); chat=(--tokens 3); ilf=(--shapes tiny-dit tiny-pixart --batch 1 2)
  images=(--clients 1 2 --requests 2 --pairs 2 --rounds 1)
else
  precision=(); chat=(); ilf=(--shapes dit-xl-2 pixart-256 --batch 1 16 --repeats 3); images=(--clients 1 4 16)
fi
dtype=$([ "$DEVICE" = cuda ] && echo bf16 || echo fp32)

step "bench.chat_precision"
"$PY" -m bench.chat_precision --artifacts "$ROOT" --device "$DEVICE" --out "$OUT/chat_precision" "${precision[@]}"
step "bench.chat"
"$PY" -m bench.chat --artifacts "$ROOT" --device "$DEVICE" --out "$OUT/chat" "${chat[@]}"
step "bench.ilf_real_scale"
"$PY" -m bench.ilf_real_scale --device "$DEVICE" --dtype "$dtype" --out "$OUT/ilf_real_scale.json" "${ilf[@]}"
step "bench.images"
"$PY" -m bench.images --artifacts "$ROOT" --model "$IMAGE_MODEL" --device "$DEVICE" --out "$OUT/images" "${images[@]}"
step "bench.gpu_report"
"$PY" -m bench.gpu_report --out "$OUT" --device "$DEVICE"
step "done"
