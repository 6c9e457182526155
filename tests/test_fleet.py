"""--executor ray on a real local Ray cluster: two nodes on 127.0.0.1, one benchmark slot each."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, load_report, read_until, start_cli, ub

ray = pytest.importorskip("ray", reason="ray is in requirements.txt; install it to run the cluster tests")

RAY_PROCESSES = re.compile(r"raylet|gcs_server|ray::|default_worker\.py")


def ray_processes() -> list[str]:
    """Command lines of Ray's own processes on this machine."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if RAY_PROCESSES.search(cmd):
            found.append(f"{pid}: {cmd[:120]}")
    return found


def test_a_local_ray_started_for_the_run_is_gone_after_ctrl_c(tmp_path, one_image_dir):
    """No cluster running: the run starts its own Ray; Ctrl-C cancels the task and stops it all."""
    assert not ray_processes(), "a Ray cluster is already running on this machine"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = start_cli("--executor", "ray", "--weights", "random", "--models", "mobilesam", "--runs", "30",
                     "--no-dissect", "--images", one_image_dir, "--output-dir", tmp_path, env=env)
    lines: list[str] = []
    try:
        read_until(proc, r"starting a local one for this run", lines)
        pid = int(read_until(proc, r"Worker process (\d+) started for MobileSAMBenchmark", lines).group(1))
        read_until(proc, r"\[INFER 1/30\]", lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    deadline = time.monotonic() + 20
    while (ray_processes() or os.path.exists(f"/proc/{pid}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() and not os.path.exists(f"/proc/{pid}")


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster of two nodes on this machine, each with one benchmark slot."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {ub.RAY_SLOT: 1},
                                                           "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={ub.RAY_SLOT: 1})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()
    deadline = time.monotonic() + 20
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), ray_processes()


def run_on(cluster, tmp_path, images, *args) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, str(REPO / "unified_benchmark.py"), "--executor", "ray", "--ray-address",
                           cluster.address, "--weights", "random", "--images", str(images), "--output-dir",
                           str(tmp_path), *map(str, args)], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_spread_runs_two_models_on_two_nodes_at_once(cluster, tmp_path, one_image_dir):
    code, text = run_on(cluster, tmp_path, one_image_dir, "--models", "yolo11n-detect,yolo11n-pose", "--runs", "15",
                        "--no-dissect")
    assert code == 0, text
    report = load_report(tmp_path)
    assert report["executor"] == "ray" and report["fleet"] == "spread" and report["files"] == "shared folder"
    detect, pose = report["results"]
    assert detect["status"] == pose["status"] == "ok"
    assert detect["node_id"] != pose["node_id"]  # one model per node, never two on one
    assert detect["node"]["hostname"] and detect["node"]["machine_key"]
    overlap = min(detect["finished_wall"], pose["finished_wall"]) - max(detect["started_wall"], pose["started_wall"])
    assert overlap > 0, "the two models did not run at the same time"
    md = next((tmp_path / "results").glob("benchmark_report_*.md")).read_text(encoding="utf-8")
    assert f"YOLO11n-Detect @ {detect['node_label']}" in md


def test_every_node_writes_one_merged_report_with_two_machine_columns(cluster, tmp_path, one_image_dir):
    code, text = run_on(cluster, tmp_path, one_image_dir, "--models", "yolo11n-detect", "--runs", "2",
                        "--fleet", "every-node", "--ray-files", "object-store")
    assert code == 0, text
    rows = load_report(tmp_path)["results"]
    assert len(rows) == 2 and len({r["node_id"] for r in rows}) == 2
    for row in rows:  # dissection files came through the object store into a folder per node
        assert row["files_transfer"].startswith("object store")
        meta = json.loads((Path(row["viz_dir"]) / "layers_metadata.json").read_text(encoding="utf-8"))
        assert meta["total_outputs"] == 259
        assert len(list(Path(row["viz_dir"]).glob("layer_*.png"))) == len([l for l in meta["layers"] if l["files"]])
    merged = next((tmp_path / "results").glob("merged_report_*.md")).read_text(encoding="utf-8")
    assert "| Model | M1 | M2 |" in merged
    assert all(row["node_label"] in merged for row in rows)


def test_a_worker_killed_on_a_node_is_one_crashed_row(cluster, tmp_path, one_image_dir):
    proc = start_cli("--executor", "ray", "--ray-address", cluster.address, "--weights", "random", "--models",
                     "mobilesam,yolo11n-detect", "--runs", "12", "--no-dissect", "--keep-going",
                     "--images", one_image_dir, "--output-dir", tmp_path)
    lines: list[str] = []
    try:
        pid = int(read_until(proc, r"Worker process (\d+) started for MobileSAMBenchmark", lines).group(1))
        read_until(proc, r"\[INFER 1/12\] bus.jpg", lines)
        os.kill(pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, "".join(lines) + rest
    sam, yolo = load_report(tmp_path)["results"]
    assert sam["status"] == "crashed" and sam["worker_signal"] == "SIGKILL" and sam["node_id"]
    assert sam["failed_phase"] == "inference"
    assert yolo["status"] == "ok"


def test_every_gpu_type_runs_the_suite_once_per_kind_of_node(cluster, tmp_path, one_image_dir):
    """Both nodes are CPU nodes: one kind, so the suite runs once, on one node, all models there."""
    code, text = run_on(cluster, tmp_path, one_image_dir, "--models", "yolo11n-detect,yolo11n-pose", "--runs", "2",
                        "--no-dissect", "--fleet", "every-gpu-type")
    assert code == 0, text
    rows = load_report(tmp_path)["results"]
    assert [r["status"] for r in rows] == ["ok", "ok"] and len({r["node_id"] for r in rows}) == 1
    merged = next((tmp_path / "results").glob("merged_report_*.md")).read_text(encoding="utf-8")
    assert "| Model | M1 |" in merged and "M2" not in merged
