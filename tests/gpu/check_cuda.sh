#!/usr/bin/env bash
# GPU check (one command, budgeted to under 7.5 minutes on one H200): a YOLO11n dissection run,
# YOLO11n in fp16 with --compile reduce-overhead, all eight models in fp32 (random weights, full
# size), a planted 1 GiB allocation, bf16 on DA-V2 Small and MobileSAM, and YOLO11n and DA-V2
# Small on torch and onnxruntime (CUDA provider; "skipped" without onnxruntime-gpu); then check_cuda.py's checks and one
# table. Everything printed is also written to $OUT/gpu_check.log when $OUT is set, else to
# <out>/gpu_check.log. Offline: HF, transformers and Ultralytics never touch the network.
#
#     bash tests/gpu/check_cuda.sh [--wheels DIR] [--out DIR] [--parts dissect,fp32,...] [--bf16-models all]
#
# Needs python3 with torch (CUDA), transformers, numpy, pillow, psutil, scipy, matplotlib,
# opencv(-headless) and optionally nvidia-ml-py. Ultralytics, when `import ultralytics` fails, is
# installed from DIR (default .whl/) into /tmp/site, no network, no dependencies: its other needs are
# there or imported lazily (polars and ultralytics-platform are never imported on these paths).
# Make the two wheels here, in the repo root, on a connected machine (/.whl/ is git-ignored;
# both are pure-Python py3-none-any wheels; the versions are `pip show ultralytics ultralytics-thop`):
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         --platform any -d .whl ultralytics==8.4.190 ultralytics-thop==2.2.3
set -uo pipefail
cd "$(dirname "$0")/../.."
wheels=".whl"
out=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
out="${out:-$(mktemp -d "${TMPDIR:-/tmp}/vision-bench-gpu-XXXXXX")}"
mkdir -p "$out"
log="${OUT:+$OUT/gpu_check.log}"
log="${log:-$out/gpu_check.log}"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=False ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS=1 YOLO_VERBOSE=False
export YOLO_CONFIG_DIR="$out/ultralytics-config"  # a writable settings folder of its own

check() {
  local start=$SECONDS
  if ! timeout 60 python3 -c "import ultralytics" 2>/dev/null; then
    echo "check_cuda: no Ultralytics; installing $wheels/*.whl into /tmp/site"
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheels"/*.whl || { echo "check_cuda: installing the wheels failed"; return 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"  # the program's workers inherit it
  fi
  # The check keeps to its own budget (--budget-sec); this outer limit only catches a hang in it.
  timeout -k 5 430 python3 tests/gpu/check_cuda.py --out "$out" ${args[@]+"${args[@]}"}
  local code=$?
  echo "check_cuda.sh: exit $code, $((SECONDS - start)) s in all (log: $log)"
  return $code
}

check 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
