"""Benchmark script (prints figures; not a test): does a model's cold start depend on what ran before it?

    python tests/perf/isolation.py [--runs 5] [--rounds 1]

Runs yolo11n-seg alone and after dav2-small, each with --isolation process and --isolation
none, random weights on the CPU, the two photos that ship with Ultralytics, no dissection.
The four configurations are interleaved (one round = all four), each a fresh run of the
program, and the figures come from its JSON report: cold run, warm median, their ratio,
runtime init and load time. With a worker per model, yolo11n-seg's cold start should not
depend on its position; in one process the first model pays for the runtime's one-time work.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONFIGS = [("process", "yolo11n-seg"), ("none", "yolo11n-seg"),
           ("process", "dav2-small,yolo11n-seg"), ("none", "dav2-small,yolo11n-seg")]


def run(isolation: str, models: str, runs: int, images: Path, out: Path) -> list[dict]:
    cmd = [sys.executable, str(REPO / "unified_benchmark.py"), "--weights", "random", "--models", models,
           "--runs", str(runs), "--no-dissect", "--isolation", isolation, "--images", str(images),
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    report = sorted((out / "results").glob("benchmark_results_*.json"))[-1]
    return json.loads(report.read_text(encoding="utf-8"))["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    from ultralytics.utils import ASSETS

    print(f"{'isolation':<10}{'order':<26}{'model':<18}{'cold s':>8}{'warm med s':>11}{'cold/warm':>10}"
          f"{'init s':>8}{'load s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for name in ("bus.jpg", "zidane.jpg"):
            (images / name).symlink_to(Path(ASSETS) / name)
        for round_ in range(args.rounds):
            for n, (isolation, models) in enumerate(CONFIGS):
                order = "alone" if "," not in models else "after dav2-small"
                for row in run(isolation, models, args.runs, images, Path(tmp) / f"out{round_}_{n}"):
                    ratio = row["cold_inference_sec"] / row["warm_median_sec"]
                    print(f"{isolation:<10}{order:<26}{row['short_name']:<18}{row['cold_inference_sec']:>8.3f}"
                          f"{row['warm_median_sec']:>11.3f}{ratio:>10.2f}{row['runtime_init_sec']:>8.3f}"
                          f"{row['load_time_sec']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
