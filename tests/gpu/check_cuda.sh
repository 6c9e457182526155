#!/usr/bin/env bash
# GPU check (one command, under 8 minutes on one NVIDIA GPU): all eight models with random
# weights in fp32 and bf16, --compile for YOLO11n, then the assertions and one table printed
# by check_cuda.py. Needs torch with CUDA; Ultralytics, transformers and nvidia-ml-py are
# installed from a folder of wheels when missing (no network needed):
#
#     bash tests/gpu/check_cuda.sh [--wheels DIR] [--out DIR]
#
# Make the wheels on a connected machine with the same Python:
#     pip download -r requirements.txt nvidia-ml-py -d wheels/   (then delete the torch* wheels)
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
missing=$(python - <<'PY'
import importlib.util
print(" ".join(p for m, p in [("ultralytics", "ultralytics"), ("transformers", "transformers"),
                              ("pynvml", "nvidia-ml-py"), ("scipy", "scipy"), ("matplotlib", "matplotlib")]
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  if [ -z "$wheels" ]; then
    echo "check_cuda: missing Python packages: $missing; pass --wheels DIR with their wheels" >&2
    exit 2
  fi
  python -m pip install --quiet --no-index --find-links "$wheels" $missing
fi
exec python tests/gpu/check_cuda.py "${args[@]}"
