#!/usr/bin/env bash
# The lower-bound check: every bound in requirements.txt pinned exactly (>= becomes ==) in an
# environment of its own, then the tests that touch every library: each model family end to end
# with dissection, reports, plots and the history. The system's torch and torchvision are their
# bounds (they lie on this machine's disk), so the environment sees them.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="${TMPDIR:-/tmp}/vision-bench-lower-bounds"
pins="$env_dir.txt"
start=$(date +%s)
rm -rf "$env_dir"
python -m venv --system-site-packages "$env_dir"
sed -E 's/#.*//; s/>=/==/; s/[[:space:]]+$//' requirements.txt | grep -v '^$' > "$pins"
# (pip may warn that a plugin of the system's, pytest-benchmark, wants a newer pytest: not used here)
"$env_dir/bin/python" -m pip install -q -r "$pins" > "$env_dir.log" 2>&1 || { cat "$env_dir.log"; exit 1; }
"$env_dir/bin/python" - "$pins" <<'PY'
import importlib.metadata as md, sys
from packaging.version import Version
for line in open(sys.argv[1]):
    name, version = line.strip().split("==")
    got = md.version(name)
    assert Version(Version(got).public) == Version(version), f"{name}: {got} installed, {version} pinned"
    print(f"lower bound {name}=={version}: {got}")
PY
# The two tests that judge real timings (quiet nights against busy ones) are left to the main
# suite: they test the verdict rules, not the libraries, and need the machine to themselves.
# The runtimes' export, cache and parity on YOLO11n; their eight-model and OpenVINO runs are the main suite's.
"$env_dir/bin/python" -m pytest -q -p no:cacheprovider tests/test_end_to_end.py tests/test_models.py \
  tests/test_dissection.py tests/test_history.py tests/test_backends.py \
  --deselect tests/test_history.py::test_quiet_runs_then_busy_runs_give_suspicious_then_regression \
  --deselect tests/test_history.py::test_compare_two_real_reports_and_two_run_ids \
  --deselect tests/test_backends.py::test_all_eight_models_run_on_onnxruntime_with_parity_ok \
  --deselect tests/test_backends.py::test_openvino_runs_yolo_and_depth_anything_with_parity_ok
echo "lower-bound check passed in $(( $(date +%s) - start )) s"
rm -rf "$env_dir" "$pins" "$env_dir.log"
