#!/usr/bin/env bash
# The GPU check of record, as one device call (about 12 minutes on an H200): the preflight of every decode mode
# (benchmarks/gpu_preflight.py), the decode session (benchmarks/gpu_session.py), then ms/token of every decode path
# at BLIP-2 OPT-2.7B's and at SmolLM2-135M's LM shape (benchmarks/gpu_decode.py), then speculative decoding at forced full acceptance on both. Each step has its
# own time limit and a failing step does not stop the next. JSON files and one log go to $OUT (or ./gpu-check).
# Wheels carried in .whl/ (transformers of the version the project pins, when the machine has another) are
# installed first. STEPS picks steps (default: all of preflight session decode forced; about 12 minutes).
#
#     bash benchmarks/gpu_check.sh
#     STEPS="preflight session" bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu-check}
STEPS=${STEPS:-preflight session decode forced}
mkdir -p "$OUT"
export OUT PYTHONPATH=src:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
log="$OUT/gpu_check.log"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log stderr, go on when it fails
  local limit=$1 name=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" >/dev/null 2>>"$log" || echo "== $name FAILED (exit $?)" | tee -a "$log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; \
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"; } >>"$log" 2>&1
wants() { [[ " $STEPS " == *" $1 "* ]]; }
if wants preflight; then step 100 preflight $PY benchmarks/gpu_preflight.py; fi
if wants session; then
  step 90 "session smollm2" $PY benchmarks/gpu_session.py --shape smollm2
  step 120 "session opt-2.7b" $PY benchmarks/gpu_session.py --shape opt-2.7b --repeats 3
fi
if wants decode; then
  step 170 "decode opt-2.7b" $PY benchmarks/gpu_decode.py --shape opt-2.7b --repeats 3 --tokens 48 --subsets 4096
  step 110 "decode smollm2" $PY benchmarks/gpu_decode.py --shape smollm2 --repeats 3 --tokens 48 --subsets 4096
fi
if wants forced; then
  step 50 "forced opt-2.7b" $PY benchmarks/gpu_decode.py --shape opt-2.7b --force-accept --batch-sizes 1 --repeats 3 \
    --tokens 48 --no-hf
  step 60 "forced smollm2" $PY benchmarks/gpu_decode.py --shape smollm2 --force-accept --batch-sizes 1 8 \
    --repeats 3 --tokens 48 --no-hf
fi
grep -h -A40 "^## \|: ok\|CHECK\|row batch" "$log" | head -c 11000
