"""The GPU check behind tests/gpu/check_cuda.sh: runs the program on CUDA as cron would and
asserts what only a GPU can show. Prints one table; exit 0 when every check holds.

Checks:
- every model ok in fp32 and bf16 (random weights, full size), YOLO11n also with --compile;
- CUDA events and perf_counter-after-synchronize agree within 5% for models over 10 ms;
- a 1 GiB allocation planted inside a run is caught by the run's peak;
- memory comes back after each worker (allocated after cleanup vs baseline, and the GPU's used
  memory after the whole run vs before it);
- energy per inference is in range: idle W < mean W <= the power limit;
- MFU is known for the device and below 100%.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import unified_benchmark as ub  # noqa: E402

EVENT_TOLERANCE = 0.05
NOT_RETURNED_MAX_MB = 64
GPU_USED_SLACK_MB = 256
PLANT_MB = 1024


def gpu_used_mb() -> float | None:
    monitor = ub.GpuMonitor(torch.device("cuda"))
    info = monitor._read("nvmlDeviceGetMemoryInfo")
    return info.used / 1024**2 if info is not None else None


def run_program(out: Path, *args: str) -> dict:
    images = REPO / "tests" / "gpu" / "_images"
    images.mkdir(exist_ok=True)
    from ultralytics.utils import ASSETS

    for name in ("bus.jpg", "zidane.jpg"):
        target = images / name
        if not target.exists():
            target.write_bytes((Path(ASSETS) / name).read_bytes())
    cmd = [sys.executable, str(REPO / "unified_benchmark.py"), "--weights", "random", "--device", "cuda", "--runs", "6",
           "--no-dissect", "--no-history", "--keep-going", "--images", str(images), "--output-dir", str(out), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(f"  exit {done.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    if done.returncode not in (0, 1):
        print(done.stdout[-3000:], done.stderr[-3000:])
    (report,) = sorted((out / "results").glob("benchmark_results_*.json"))[-1:]
    return json.loads(report.read_text(encoding="utf-8"))


def planted_peak_mb() -> tuple[float, float]:
    """Peak of a plain run and of a run whose forward also holds 1 GiB, same process."""

    class Planted(ub.YOLO11nDetectBenchmark):
        def forward(self, inputs):
            ballast = torch.empty(PLANT_MB * 1024**2, dtype=torch.uint8, device=self.device)
            out = super().forward(inputs)
            del ballast
            return out

    from ultralytics.utils import ASSETS

    image = ub.decode_image(Path(ASSETS) / "bus.jpg")
    figures = []
    for cls in (ub.YOLO11nDetectBenchmark, Planted):
        bench = cls(torch.device("cuda"), "random")
        bench.load()
        bench.infer(image)
        figures.append(bench.infer(image)["peak_cuda_allocated_mb"])
        bench.cleanup()
    return figures[0], figures[1]


def check_rows(label: str, payload: dict, failures: list[str], table: list[list[str]]) -> None:
    for r in payload["results"]:
        name = f"{r['model_name']} {label}"
        if r["status"] != "ok":
            failures.append(f"{name}: {r['status']}: {r.get('error')}")
            table.append([name, r["status"]] + ["-"] * 10)
            continue
        host, events = r["warm_median_sec"], r["warm_median_event_sec"]
        diff = events / host - 1 if events and host else None
        if host and host > 0.010 and (diff is None or abs(diff) > EVENT_TOLERANCE):
            failures.append(f"{name}: events {events} s vs host {host} s ({diff})")
        if r["mem_not_returned_mb"] is None or r["mem_not_returned_mb"] > NOT_RETURNED_MAX_MB:
            failures.append(f"{name}: {r['mem_not_returned_mb']} MB not returned after cleanup")
        if r["mfu"] is None or not 0 < r["mfu"] < 1:
            failures.append(f"{name}: MFU {r['mfu']} (peak {r['peak_tflops']} for {r['dtype']})")
        idle, mean, limit = r["power_idle_w"], r["power_mean_w"], r["power_limit_w"]
        if None in (idle, mean, limit) or not idle < mean <= limit:
            failures.append(f"{name}: power idle {idle} W, mean {mean} W, limit {limit} W")
        table.append([name, "ok", f"{host * 1000:.2f}", f"{events * 1000:.2f}" if events else "n/a",
                      f"{diff:+.1%}" if diff is not None else "n/a", f"{r['gflops']:.1f}",
                      f"{r['achieved_tflops']:.2f}", f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a",
                      f"{r['energy_j_per_inference']:.3f}" if r["energy_j_per_inference"] is not None else "n/a",
                      f"{mean:.0f}/{idle:.0f}" if mean is not None and idle is not None else "n/a",
                      f"{r['mem_peak_mb']:.0f}", f"{r['mem_not_returned_mb']:+.0f}"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where the reports go (default: a temporary folder)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_cuda: no CUDA device here")
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="vision-bench-gpu-"))
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, reports in {out}", flush=True)
    failures, table = [], []
    used_before = gpu_used_mb()
    runs = [("fp32", run_program(out / "fp32")),
            ("bf16", run_program(out / "bf16", "--dtype", "bf16")),
            ("bf16+compile", run_program(out / "compile", "--dtype", "bf16", "--compile", "--models", "yolo11n-detect"))]
    used_after = gpu_used_mb()
    for label, payload in runs:
        check_rows(label, payload, failures, table)
    compiled = runs[2][1]["results"][0]
    if compiled["status"] == "ok" and not compiled["compile_sec"]:
        failures.append("--compile: no compile_sec")
    plain, planted = planted_peak_mb()
    if planted - plain < PLANT_MB * 0.99:
        failures.append(f"planted {PLANT_MB} MB: peak {planted:.0f} MB vs {plain:.0f} MB without")
    if used_before is not None and used_after is not None and used_after - used_before > GPU_USED_SLACK_MB:
        failures.append(f"GPU memory used {used_before:.0f} MB before the runs, {used_after:.0f} MB after")
    header = ["model", "status", "host ms", "events ms", "diff", "GFLOPs", "TFLOP/s", "MFU", "J/inf",
              "W mean/idle", "peak MB", "not returned MB"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print(f"\nplanted {PLANT_MB} MB: peak {plain:.0f} -> {planted:.0f} MB; GPU used before/after all runs: "
          f"{used_before} / {used_after} MB; compile_sec {compiled.get('compile_sec')}, "
          f"recompilations {compiled.get('recompilations')}")
    for failure in failures:
        print("FAIL", failure)
    print("GPU check:", "PASSED" if not failures else f"{len(failures)} FAILED")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
