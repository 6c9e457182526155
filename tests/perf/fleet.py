"""Benchmark script (prints figures; not a test): four models on one Ray node against two.

    python tests/perf/fleet.py [--runs 5]

Starts a real local Ray cluster (ray.cluster_utils.Cluster) with one node holding one
benchmark slot, runs yolo11n-detect, yolo11n-seg, yolo11n-pose and mobilesam with
--executor ray --fleet spread (random weights, the two Ultralytics photos, no dissection),
then does the same on a cluster of two such nodes. Prints the wall time of each and every
model's warm median in both. On a 2-core machine two nodes share the cores, so expect
little speed-up and warm medians that move with the sharing; the point is that spreading
is correct. On nodes that do not share cores the warm medians should agree within noise.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import unified_benchmark as ub  # noqa: E402

MODELS = "yolo11n-detect,yolo11n-seg,yolo11n-pose,mobilesam"


def run_on_cluster(nodes: int, runs: int, images: Path, out: Path) -> tuple[float, dict]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {ub.RAY_SLOT: 1},
                                                           "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1, resources={ub.RAY_SLOT: 1})
    cluster.wait_for_nodes()
    try:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "unified_benchmark.py"), "--executor", "ray", "--ray-address",
                               cluster.address, "--weights", "random", "--models", MODELS, "--runs", str(runs),
                               "--no-dissect", "--no-history", "--images", str(images), "--output-dir", str(out)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
    finally:
        cluster.shutdown()
    if proc.returncode != 0:
        sys.exit(f"the run on {nodes} node(s) failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    report = json.loads(sorted((out / "results").glob("benchmark_results_*.json"))[-1].read_text(encoding="utf-8"))
    return wall, {r["short_name"]: r for r in report["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from ultralytics.utils import ASSETS

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for name in ("bus.jpg", "zidane.jpg"):
            (images / name).symlink_to(Path(ASSETS) / name)
        one_wall, one = run_on_cluster(1, args.runs, images, Path(tmp) / "one")
        two_wall, two = run_on_cluster(2, args.runs, images, Path(tmp) / "two")
    print(f"wall time, {len(one)} models: one node {one_wall:.1f} s, two nodes {two_wall:.1f} s "
          f"(two/one = {two_wall / one_wall:.2f}x; {os.cpu_count()} cores shared by both nodes)")
    print(f"{'model':<16}{'one node: warm median s':>26}{'two nodes: warm median s':>27}{'ratio':>8}  nodes used")
    for name in one:
        a, b = one[name]["warm_median_sec"], two[name]["warm_median_sec"]
        print(f"{name:<16}{a:>26.3f}{b:>27.3f}{b / a:>8.2f}  {one[name]['node_id'][:8]} / {two[name]['node_id'][:8]}")


if __name__ == "__main__":
    main()
