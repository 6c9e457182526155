"""Benchmark script (prints figures; not a test): a model past 2 GB on ONNX Runtime, as a user runs it.

    python tests/perf/large_export.py [--model depthpro] [--runs 1] [--again] [--keep DIR]

DepthPro at full size (random weights, about 952M parameters, 3.6 GiB in float32) is past
protobuf's 2 GB limit, so its export takes the exporter's external-data path. This runs the
program's own command line on bus.jpg, `--backend onnxruntime --runs 1 --no-dissect`, in a
worker process, and prints what the row says of the export (exporter, files, size, time), the
session, the forward and its parity against fp32 PyTorch, the timed runs' peak RSS and the
largest process's peak over the whole run. --again runs it a second time on the same models
folder: the export must be a cache hit (every file's size and SHA-256 checked). About 22 minutes
per run on 2 CPU cores, and 24 GB of memory: the accuracy check's fp32 reference is a second
copy of the weights. The random checkpoint (3.6 GiB) is built once and kept in the program's
cache folder (VISION_BENCH_CACHE, default ~/.cache/vision-bench). Nothing else running.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIELDS = ["status", "export_exporter", "export_cached", "export_mb", "export_sec", "load_time_sec",
          "torch_load_sec", "cold_inference_sec", "warm_median_sec", "rss_peak_mb", "parity", "parity_rel_l2_max",
          "runtime_settings"]


def run_once(model: str, runs: int, work: Path, label: str) -> dict:
    """One run of the program's command line; its row, the export folder's file count and the run's time."""
    out = work / f"out-{label}"
    shutil.rmtree(out, ignore_errors=True)  # one report to read, with --keep DIR run again
    command = [sys.executable, str(REPO / "unified_benchmark.py"), "--models", model, "--weights", "random",
               "--backend", "onnxruntime", "--runs", str(runs), "--no-dissect", "--images", str(work / "images"),
               "--output-dir", str(out), "--models-dir", str(work / "models")]
    env = {k: v for k, v in os.environ.items() if k != "VISION_BENCH_REDUCED_CONFIG"}  # the real size
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    wall_sec = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    (report,) = sorted((out / "results").glob("benchmark_results_*.json"))
    (row,) = json.loads(report.read_text(encoding="utf-8"))["results"]
    model_file = Path(row["export_path"])
    data = [p for p in model_file.parent.iterdir() if p.name not in (model_file.name, "export.json")]
    return {"row": row, "data_files": len(data), "data_mb": sum(p.stat().st_size for p in data) / 1024**2,
            "wall_sec": wall_sec, "onnx_mb": model_file.stat().st_size / 1024**2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="depthpro")
    parser.add_argument("--runs", type=int, default=1, help="--runs of the program (1: the cold run alone)")
    parser.add_argument("--again", action="store_true", help="a second run: the export from the cache")
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()
    work = (args.keep or Path(tempfile.mkdtemp(prefix="vision-bench-large-"))).resolve()  # the run's cwd is work
    (work / "images").mkdir(parents=True, exist_ok=True)
    from ultralytics.utils import ASSETS

    shutil.copy(Path(ASSETS) / "bus.jpg", work / "images" / "bus.jpg")
    try:
        runs = [run_once(args.model, args.runs, work, "first")]
        if args.again:
            runs.append(run_once(args.model, args.runs, work, "again"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest process, in KiB
    for label, run in zip(("first run", "second run"), runs):
        row = run["row"]
        print(f"{args.model} on ONNX Runtime, {label}: {run['wall_sec']:.0f} s for the whole run")
        print(f"  export folder: model.onnx {run['onnx_mb']:.1f} MB, {run['data_files']} external data file(s) "
              f"{run['data_mb']:.1f} MB")
        for field in FIELDS:
            print(f"  {field}: {row.get(field)}")
    print(f"peak RSS of the largest process: {peak_rss_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
