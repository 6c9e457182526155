"""--executor ray on a real local Ray cluster: two nodes on 127.0.0.1, one benchmark slot each.

Order matters: the first test needs a machine without Ray; the `ray start` test runs next and
ends with `ray stop` (which stops every Ray process on the machine), before the module's
cluster fixture starts. Every cluster here gives its nodes a temporary folder of their own, so
the tests can check that a run leaves nothing in it."""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, load_report, read_until, start_cli, ub, write_yolo_checkpoint

import ray  # noqa: E402,F401  (in requirements.txt: a missing ray is an error here, never a silent skip)

pytestmark = pytest.mark.slow  # real clusters: about 3 minutes in all

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


def wait_until_no_ray(timeout_sec: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout_sec
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    return ray_processes()


def litter(folder: Path) -> list[str]:
    """The program's folders in a temporary folder (a run must leave none, whatever ended its tasks)."""
    return sorted(p.name for p in folder.glob("vision-bench-*"))


@pytest.fixture
def private_tmp():
    """A temporary folder of the test's own, with a short path (Ray puts its sockets under TMPDIR)."""
    folder = Path(tempfile.mkdtemp(prefix="vbt-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_local_ray_started_for_the_run_is_gone_after_ctrl_c(tmp_path, one_image_dir, private_tmp):
    """No cluster running: the run starts its own Ray; Ctrl-C cancels the task (ray.cancel kills
    its process: it never cleans up itself) and stops it all, leaving no folder behind."""
    assert not ray_processes(), "a Ray cluster is already running on this machine"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TMPDIR": str(private_tmp)}
    proc = start_cli("--executor", "ray", "--weights", "random", "--models", "mobilesam", "--runs", "30",
                     "--no-dissect", "--images", one_image_dir, "--output-dir", tmp_path, env=env)
    lines: list[str] = []
    try:
        read_until(proc, r"starting a local one for this run", lines)  # the first INFER line: 64 s beside two hogs
        pid = int(read_until(proc, r"Worker process (\d+) started for MobileSAMBenchmark", lines, timeout=300).group(1))
        read_until(proc, r"\[INFER 1/30\]", lines, timeout=300)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    deadline = time.monotonic() + 60  # Ray's own shutdown, on a busy machine too
    while (ray_processes() or os.path.exists(f"/proc/{pid}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = ray_processes()
    if left:  # never leave them to the next test, whose first check is that none run
        ray_command("stop", "--force", env=dict(os.environ))
    assert not left and not os.path.exists(f"/proc/{pid}"), left
    assert litter(private_tmp) == [], "".join(lines) + rest


def ray_command(*args: str, env: dict) -> subprocess.CompletedProcess:
    """The `ray` command line of this Python environment."""
    exe = Path(sys.executable).with_name("ray")
    return subprocess.run([str(exe) if exe.exists() else "ray", *args], capture_output=True, text=True, env=env,
                          timeout=180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def driver(env: dict, *args, timeout: float = 300) -> tuple[int, str, float]:
    """The program as a user runs it, in exactly this environment: exit code, output, seconds."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "unified_benchmark.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_the_readme_recipe_ray_start_with_token_auth(tmp_path, private_tmp, one_image_dir):
    """README's "Many machines" commands as a user types them on Ray 2.60: a head and a second node
    started with `ray start`, token authentication on. The driver gets no RAY_AUTH_MODE: it finds
    the token where Ray documents it (here RAY_AUTH_TOKEN_PATH) and runs two models on the two
    nodes; without a token it exits 2 at once with the fix. `ray stop` leaves no Ray process."""
    assert not ray_processes(), "a Ray cluster is already running on this machine"
    token = private_tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    user = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    user |= {"TMPDIR": str(private_tmp), "RAY_AUTH_TOKEN_PATH": str(token)}
    nodes_env = user | {"RAY_AUTH_MODE": "token", ub.RAY_NICENESS_ENV: "0"}  # as the README's commands
    address, slot = f"127.0.0.1:{free_port()}", json.dumps({ub.RAY_SLOT: 1})
    small = ("--weights", "random", "--runs", "2", "--no-dissect", "--no-history", "--images", one_image_dir)
    try:
        head = ray_command("start", "--head", "--port", address.split(":")[1], "--resources", slot, "--num-cpus", "1",
                           "--include-dashboard", "false", "--disable-usage-stats", env=nodes_env)
        assert head.returncode == 0, head.stderr[-3000:]  # the tokenless driver below proves token auth is on
        other = ray_command("start", "--address", address, "--resources", slot, "--num-cpus", "1",
                            "--disable-usage-stats", env=nodes_env)
        assert other.returncode == 0, other.stderr[-3000:]
        code, text, _ = driver(user, "--executor", "ray", "--ray-address", address, "--models",
                               "yolo11n-detect,yolo11n-pose", *small, "--output-dir", tmp_path / "a")
        assert code == 0 and f"uses token authentication: using the token from {token}" in text, text
        assert "InvalidAuthToken" not in text and "Traceback" not in text
        detect, pose = load_report(tmp_path / "a")["results"]
        assert detect["status"] == pose["status"] == "ok" and detect["node_id"] != pose["node_id"]
        tokenless = {k: v for k, v in user.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"HOME": str(private_tmp)}
        code, text, seconds = driver(tokenless, "--executor", "ray", "--ray-address", address, "--models",
                                     "yolo11n-detect", *small, "--output-dir", tmp_path / "b")
        assert code == ub.EXIT_USAGE and "uses token authentication and this machine has no token" in text, text
        assert "RAY_AUTH_TOKEN" in text and "Traceback" not in text and seconds < 60
    finally:
        stop = ray_command("stop", env=user)
        assert not wait_until_no_ray(), (stop.stdout + stop.stderr)[-2000:]
    assert litter(private_tmp) == []


def test_a_missing_ray_or_an_unreachable_address_is_exit_2_with_the_fix(tmp_path, one_image_dir):
    args = ("--executor", "ray", "--weights", "random", "--models", "yolo11n-detect", "--no-dissect", "--images",
            one_image_dir, "--output-dir", tmp_path)
    code, text, seconds = driver(dict(os.environ), *args, "--ray-address", f"127.0.0.1:{free_port()}")
    assert code == ub.EXIT_USAGE and "no Ray cluster answers at 127.0.0.1:" in text and "Traceback" not in text, text
    assert seconds < 60
    hide_ray = f"import sys; sys.modules['ray'] = None; sys.path.insert(0, {str(REPO)!r}); import unified_benchmark " \
               f"as ub; sys.exit(ub.main({[str(a) for a in args]!r}))"
    proc = subprocess.run([sys.executable, "-c", hide_ray], capture_output=True, text=True, timeout=120)
    assert proc.returncode == ub.EXIT_USAGE, proc.stdout + proc.stderr
    assert "needs the ray package" in proc.stdout and "pip install" in proc.stdout and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real Ray cluster of two nodes on this machine, each with one benchmark slot. Its nodes get
    a temporary folder of their own (cluster.node_tmp: the tests check a run leaves nothing there)
    and an empty Hugging Face cache (pretrained DA-V2 is missing on every node, as on a new machine)."""
    from ray.cluster_utils import Cluster

    node_tmp = Path(tempfile.mkdtemp(prefix="vbt-"))
    before = {k: os.environ.get(k) for k in ("TMPDIR", "HF_HUB_CACHE", ub.RAY_NICENESS_ENV)}
    os.environ.update(TMPDIR=str(node_tmp), HF_HUB_CACHE=str(tmp_path_factory.mktemp("empty-hub")),
                      **{ub.RAY_NICENESS_ENV: "0"})  # as the README says to start nodes
    try:  # the nodes' processes inherit these; this process keeps its own
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {ub.RAY_SLOT: 1},
                                                               "include_dashboard": False})
        cluster.add_node(num_cpus=1, resources={ub.RAY_SLOT: 1})
        cluster.wait_for_nodes()
    finally:
        for key, value in before.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    cluster.node_tmp = node_tmp
    yield cluster
    cluster.shutdown()
    assert not wait_until_no_ray(20), ray_processes()
    shutil.rmtree(node_tmp, ignore_errors=True)


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
    assert detect["device"] == pose["device"] == "cpu"
    assert detect["threads"] == pose["threads"] == 1  # each node offers Ray one CPU: one thread each
    assert detect["niceness"] == pose["niceness"] == 0  # not Ray's nice 15 for its workers
    assert sorted(n["ordinal"] for n in report["nodes"]) == [1, 2]  # two nodes on one host: numbered
    md = next((tmp_path / "results").glob("benchmark_report_*.md")).read_text(encoding="utf-8")
    assert f"YOLO11n-Detect @ {detect['node_label']}" in md


def test_a_worker_or_a_task_killed_on_a_node_is_a_crashed_row_naming_the_node(cluster, tmp_path, one_image_dir):
    """spread: MobileSAM's worker is killed (its runner on the node reports it) and YOLO's whole task
    process is killed (as when its node is lost; the task said which node it runs on as it began).
    Two crashed rows, each naming its node, and no folder left behind."""
    proc = start_cli("--executor", "ray", "--ray-address", cluster.address, "--weights", "random", "--models",
                     "mobilesam,yolo11n-detect", "--runs", "12", "--no-dissect", "--keep-going",
                     "--images", one_image_dir, "--output-dir", tmp_path)
    lines: list[str] = []
    started: dict[str, tuple[int, int]] = {}  # model -> (its Ray task's pid, its worker's pid)
    try:
        while len(started) < 2:
            found = read_until(proc, r"\(ray_model_task pid=(\d+)[^)]*\) \[WORKER\] Worker process (\d+) started "
                                     r"for (MobileSAM|YOLO11nDetect)Benchmark", lines, timeout=300)
            started[found.group(3)] = int(found.group(1)), int(found.group(2))
        os.kill(started["YOLO11nDetect"][0], signal.SIGKILL)
        read_until(proc, rf"\(ray_model_task pid={started['MobileSAM'][0]}[^)]*\) \[INFER 1/12\] bus.jpg", lines)
        os.kill(started["MobileSAM"][1], signal.SIGKILL)
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 1, text
    sam, yolo = load_report(tmp_path)["results"]
    assert sam["status"] == "crashed" and sam["worker_signal"] == "SIGKILL" and sam["failed_phase"] == "inference"
    assert yolo["status"] == "crashed" and "died: WorkerCrashedError" in yolo["error"], yolo["error"]
    assert sam["node_label"] and yolo["node_label"] and sam["node_id"] != yolo["node_id"]
    assert yolo["node_id"][:12] in yolo["error"] and "its node" not in yolo["error"]
    md = next((tmp_path / "results").glob("benchmark_report_*.md")).read_text(encoding="utf-8")
    assert f"YOLO11nDetectBenchmark @ {yolo['node_label']}" in md
    assert litter(cluster.node_tmp) == [], text


def test_every_node_one_merged_report_a_column_per_node_even_for_a_killed_task(cluster, tmp_path, one_image_dir):
    """every-node on two nodes of one host, files through the object store. YOLO11n-Detect runs on
    both nodes: two folders of pictures, one per node. One node's YOLO11n-Pose task process is
    killed while its worker runs (as when its node is lost: nothing there cleans up): its row names the node and
    is in that node's column of the merged report; DA-V2, missing on every node, is a skipped row
    per node; the history keeps all six rows under two node keys; no folder is left behind."""
    models = tmp_path / "models"
    models.mkdir()
    write_yolo_checkpoint(ub.YOLO11nDetectBenchmark, models / "yolo11n.pt")
    write_yolo_checkpoint(ub.YOLO11nPoseBenchmark, models / "yolo11n-pose.pt")
    proc = start_cli("--executor", "ray", "--ray-address", cluster.address, "--fleet", "every-node", "--models",
                     "dav2-small,yolo11n-detect,yolo11n-pose", "--weights", "pretrained", "--models-dir", models,
                     "--runs", "3", "--ray-files", "object-store", "--keep-going", "--images", one_image_dir,
                     "--output-dir", tmp_path / "out")
    lines: list[str] = []
    try:
        # Its worker runs (Ray's log lines can come later than the short run itself): kill the task.
        pid = int(read_until(proc, r"\(ray_model_task pid=(\d+)[^)]*\) \[WORKER\] Worker process \d+ started for "
                                   r"YOLO11nPoseBenchmark", lines, timeout=300).group(1))
        os.kill(pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 1, text
    rows = load_report(tmp_path / "out")["results"]
    assert sorted((r["class_name"], r["status"]) for r in rows) == [
        ("DepthAnythingV2SmallBenchmark", "skipped"), ("DepthAnythingV2SmallBenchmark", "skipped"),
        ("YOLO11nDetectBenchmark", "ok"), ("YOLO11nDetectBenchmark", "ok"),
        ("YOLO11nPoseBenchmark", "crashed"), ("YOLO11nPoseBenchmark", "ok")], text
    dead = next(r for r in rows if r["status"] == "crashed")
    pose = next(r for r in rows if r["status"] == "ok" and r["class_name"] == "YOLO11nPoseBenchmark")
    assert dead["node_label"] and dead["node_label"] != pose["node_label"] and dead["node_id"][:12] in dead["error"]
    detect = [r for r in rows if r["class_name"] == "YOLO11nDetectBenchmark"]
    assert {r["node_label"] for r in detect} == {dead["node_label"], pose["node_label"]}
    assert len({r["viz_dir"] for r in detect}) == 2  # one folder per node, never one written over another
    for row in detect:
        assert row["files_transfer"].startswith("object store")  # into the node's own folder
        meta = json.loads((Path(row["viz_dir"]) / "layers_metadata.json").read_text(encoding="utf-8"))
        assert meta["total_outputs"] == 259 and f"node-{row['node_id'][:8]}" in row["viz_dir"]
        assert len(list(Path(row["viz_dir"]).glob("layer_*.png"))) == len([l for l in meta["layers"] if l["files"]])
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["node_label"] for r in skipped} == {dead["node_label"], pose["node_label"]}
    assert all(r["node_id"][:12] in r["error"] and "is missing" in r["error"] for r in skipped)
    merged = next((tmp_path / "out" / "results").glob("merged_report_*.md")).read_text(encoding="utf-8")
    warm = merged.split("## Warm median (s)")[1].split("\n## ")[0]
    assert "| Model | M1 | M2 |" in warm and dead["node_label"] in merged and pose["node_label"] in merged
    assert re.search(r"\| YOLO11n-Pose \| (crashed \| [0-9.]+|[0-9.]+ \| crashed) \|", warm), warm
    assert re.search(r"\| YOLO11n-Detect \| [0-9.]+ \| [0-9.]+ \|", warm), warm
    assert "| DepthAnythingV2-Small | skipped | skipped |" in warm, warm
    with sqlite3.connect(tmp_path / "out" / "results" / ub.HISTORY_FILE_NAME) as db:  # both nodes share one host
        stored = sorted(db.execute("SELECT class_name, status, machine_key FROM model_results"))
    keys = sorted({key for _, _, key in stored})
    assert len(stored) == 6 and len(keys) == 2 and keys[0].endswith("#1") and keys[1].endswith("#2"), stored
    assert litter(cluster.node_tmp) == [], text


def test_every_gpu_type_runs_the_suite_once_per_kind_of_node(cluster, tmp_path, one_image_dir):
    """Both nodes are CPU nodes: one kind, so the suite runs once, on one node, all models there."""
    code, text = run_on(cluster, tmp_path, one_image_dir, "--models", "yolo11n-detect,yolo11n-pose", "--runs", "2",
                        "--no-dissect", "--fleet", "every-gpu-type")
    assert code == 0, text
    rows = load_report(tmp_path)["results"]
    assert [r["status"] for r in rows] == ["ok", "ok"] and len({r["node_id"] for r in rows}) == 1
    merged = next((tmp_path / "results").glob("merged_report_*.md")).read_text(encoding="utf-8")
    assert "| Model | M1 |" in merged and "M2" not in merged
