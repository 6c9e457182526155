"""--executor ray decisions as pure functions: no cluster, no Ray process (milliseconds; the priority
test starts two short processes).

What runs where and on which device, what a skipped or dead task's row says, the history key of a
node, which temporary folders go, and where the cluster token comes from. The cluster tests
(test_fleet.py) run the same code against real Ray nodes.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, ub

HEAD = ub.HEAD_RESOURCE


def ray_node(node_id: str, host: str, gpu: int = 0, slot: bool = True, alive: bool = True, head: bool = False,
             port: int = 40000, kind: str | None = None, name: str = "10.0.0.1") -> dict:
    """A node as ray.nodes() lists it (the fields the program reads)."""
    res = {"CPU": 8.0, "memory": 1e10, f"node:{name}": 1.0, **({ub.RAY_SLOT: 1.0} if slot else {}),
           **({"GPU": float(gpu)} if gpu else {}), **({f"accelerator_type:{kind}": 1.0} if kind else {}),
           **({HEAD: 1.0} if head else {})}
    return {"NodeID": node_id * (56 // len(node_id)), "Alive": alive, "NodeManagerHostname": host,
            "NodeManagerAddress": name, "NodeName": name, "NodeManagerPort": port, "Resources": res}


def fleet_node(node: dict, skips: dict | None = None, **facts) -> "ub.FleetNode":
    gpu = node["Resources"].get("GPU", 0) >= 1
    return ub.FleetNode(node, "auto" if gpu else "cpu", gpu, skips=skips or {},
                        facts={"hostname": node["NodeManagerHostname"], "gpu_name": "H100" if gpu else None,
                               "machine_key": f"mk-{node['NodeManagerHostname']}", "environment": {"device": "x"},
                               **facts})


# -- devices: which nodes run, on what --------------------------------------------------------

GPU_NODE, CPU_NODE = ray_node("a", "gpu1", gpu=2, kind="H100"), ray_node("c", "cpu1")


def test_auto_in_pinned_modes_runs_cpu_nodes_on_their_cpu():
    """Main asked for a GPU on every task once the cluster had one: CPU nodes never ran anything."""
    for fleet in ("every-node", "every-gpu-type"):
        nodes, excluded = ub.fleet_nodes([GPU_NODE, CPU_NODE], "auto", fleet)
        assert [(n.node["NodeManagerHostname"], n.device, n.gpu) for n in nodes] == [
            ("gpu1", "auto", True), ("cpu1", "cpu", False)] and not excluded
    plan = ub.fleet_plan([ub.YOLO11nDetectBenchmark], nodes, "every-node")
    assert [(p.device, p.gpu) for p in plan] == [("auto", True), ("cpu", False)]
    assert ub.ray_task_resources(plan[1].gpu) == {"num_cpus": 0, "resources": {ub.RAY_SLOT: 1}}


def test_auto_in_spread_leaves_cpu_nodes_out_saying_so_and_cpu_runs_everywhere():
    nodes, excluded = ub.fleet_nodes([GPU_NODE, CPU_NODE], "auto", "spread")
    assert [n.node["NodeManagerHostname"] for n in nodes] == ["gpu1"] and nodes[0].gpu
    assert len(excluded) == 1 and "cpu1" in excluded[0] and "every-node" in excluded[0]
    nodes, excluded = ub.fleet_nodes([ray_node("c", "cpu1"), ray_node("d", "cpu2")], "auto", "spread")
    assert [n.device for n in nodes] == ["cpu", "cpu"] and not excluded  # no GPU anywhere: all on CPU
    nodes, excluded = ub.fleet_nodes([GPU_NODE, CPU_NODE], "cpu", "spread")
    assert [(n.device, n.gpu) for n in nodes] == [("cpu", False), ("cpu", False)]
    nodes, excluded = ub.fleet_nodes([GPU_NODE, CPU_NODE, ray_node("e", "noslot", slot=False)], "cuda", "every-node")
    assert [n.device for n in nodes] == ["cuda"] and len(excluded) == 2 and "no GPU" in excluded[0]


def test_every_gpu_type_counts_cpu_nodes_as_one_type_and_picks_the_node_lacking_least():
    nodes = [fleet_node(ray_node("a", "gpu1", gpu=1, kind="H100"), {"DepthAnythingV2SmallBenchmark": "missing"}),
             fleet_node(ray_node("b", "gpu2", gpu=1, kind="H100")),
             fleet_node(ray_node("c", "cpu1")), fleet_node(ray_node("d", "cpu2"))]
    plan = ub.fleet_plan([ub.DepthAnythingV2SmallBenchmark], nodes, "every-gpu-type")
    assert [p.node.node["NodeManagerHostname"] for p in plan] == ["gpu2", "cpu1"]
    assert [p.device for p in plan] == ["auto", "cpu"] and not any(p.skip for p in plan)


# -- skipped models: only where they cannot run ---------------------------------------------------

DAV2, YOLO = ub.DepthAnythingV2SmallBenchmark, ub.YOLO11nDetectBenchmark


def test_spread_places_a_model_on_the_nodes_that_have_it_and_skips_it_only_when_none_has():
    lacking = {DAV2.__name__: "hub depth-anything/... is missing"}
    a, b = fleet_node(ray_node("a", "h1"), lacking), fleet_node(ray_node("b", "h2"))
    dav2, yolo = ub.fleet_plan([DAV2, YOLO], [a, b], "spread")
    assert dav2.skip is None and dav2.allowed == [b] and yolo.allowed is None and yolo.node is None
    assert ub.node_selector(dav2.allowed) == {"ray.io/node-id": f"in({b.node_id})"}
    b.skips = dict(lacking)
    dav2, yolo = ub.fleet_plan([DAV2, YOLO], [a, b], "spread")
    assert dav2.skip and a.where in dav2.skip and b.where in dav2.skip and yolo.skip is None
    row = ub.skipped_row(dav2)
    assert row["status"] == "skipped" and row["device"] == "cpu" and "is missing" in row["error"]


def test_every_node_skips_a_model_on_the_node_lacking_it_only_with_a_row_naming_it():
    a = fleet_node(ray_node("a", "h1"), {DAV2.__name__: "hub depth-anything/... is missing"})
    b = fleet_node(ray_node("b", "h2"))
    plan = ub.fleet_plan([DAV2, YOLO], [a, b], "every-node")
    assert [(p.cls, p.node, bool(p.skip)) for p in plan] == [(DAV2, a, True), (YOLO, a, False), (DAV2, b, False),
                                                            (YOLO, b, False)]
    row = ub.skipped_row(plan[0])
    assert row["status"] == "skipped" and row["node_id"] == a.node_id and row["node_label"] == a.label
    assert a.where in row["error"] and row["node"]["environment"] and row["node_key"] == "mk-h1"


# -- a task that died -------------------------------------------------------------------------------


def test_a_dead_task_is_a_crashed_row_naming_its_node_and_its_label():
    node = fleet_node(ray_node("a", "h1"))
    placement = ub.Placement(YOLO, "cpu", False)  # spread: Ray chose the node, the task said which
    error = RuntimeError("\x1b[36mray::ray_model_task()\x1b[39m (pid=1, ip=10.0.0.1)\nmore")
    row = ub.dead_task_row(placement, node, error)
    assert row["status"] == "crashed" and row["node_id"] == node.node_id and row["node_label"] == node.label
    assert node.where in row["error"] and "\x1b" not in row["error"] and "more" not in row["error"]
    assert ub.row_name(row) == f"YOLO11n-Detect @ {node.label}"
    row = ub.dead_task_row(placement, None, RuntimeError(""))
    assert "before it started" in row["error"] and "node_label" not in row


def test_the_merged_report_shows_a_crashed_or_skipped_model_in_its_nodes_column():
    ok = {"model_name": "YOLO11n-Detect", "status": "ok", "warm_median_sec": 0.1, "mem_peak_mb": 100.0}
    payloads = [{"run_id": "r", "environment": {}, "results": [ok]},
                {"run_id": "r", "environment": {}, "results": [{**ok, "status": "crashed"},
                                                              {"model_name": "DA-V2", "status": "skipped"}]}]
    md, csv_text = ub.merged_text(payloads, ["h1 aaaaaaaa CPU", "h1 bbbbbbbb CPU"], [])
    warm = md.split("## Warm median (s)")[1].split("\n## ")[0]
    assert "| YOLO11n-Detect | 0.100 | crashed |" in warm and "| DA-V2 | n/a | skipped |" in warm
    assert len(csv_text.splitlines()) == 2  # the CSV holds figures only


# -- the history key of a node ------------------------------------------------------------------


def test_nodes_sharing_a_host_are_numbered_head_first_whatever_their_ids_and_ports():
    tonight = [ray_node("w", "box", port=41000), ray_node("h", "box", head=True, port=45000),
               ray_node("o", "other"), ray_node("x", "box", alive=False)]
    assert ub.node_ordinals(tonight) == {tonight[1]["NodeID"]: 1, tonight[0]["NodeID"]: 2}
    tomorrow = [ray_node("q", "box", port=47000), ray_node("k", "box", head=True, port=39000), ray_node("z", "other")]
    assert ub.node_ordinals(tomorrow) == {tomorrow[1]["NodeID"]: 1, tomorrow[0]["NodeID"]: 2}
    named = [ray_node("p", "box", name="gpu-b", port=1), ray_node("r", "box", name="gpu-a", port=2)]
    assert ub.node_ordinals(named) == {named[1]["NodeID"]: 1, named[0]["NodeID"]: 2}  # --node-name orders them


def ok_row(node: "ub.FleetNode", warm_sec: float) -> dict:
    """A finished row as a node returns it (its own facts), placed as the driver places it."""
    runs = [{"image": "a.jpg", "run": r, "inference_sec": warm_sec} for r in (1, 2, 3)]
    row = {"model_name": "YOLO11n-Detect", "class_name": "YOLO11nDetectBenchmark", "status": "ok", "device": "cpu",
           "input_size": 640, "runs": runs, "warm_median_sec": warm_sec, "node": {"machine_key": "mk-box"}}
    return ub.placed_row(row, node)


def test_every_node_of_a_shared_host_keeps_its_rows_in_the_history_night_after_night(tmp_path):
    """Main stored no run at all here (IntegrityError: one key for both nodes)."""
    store = ub.HistoryStore(tmp_path / "h.sqlite")
    for night, ids in enumerate([("h", "w"), ("k", "q")]):  # new node ids and ports every `ray start`
        nodes = [ray_node(ids[0], "box", head=True, port=40000 + night), ray_node(ids[1], "box", port=30000 - night)]
        ordinals = ub.node_ordinals(nodes)
        fleet = [ub.FleetNode(n, "cpu", False, ordinals[n["NodeID"]], {"machine_key": "mk-box"}) for n in nodes]
        payload = {"run_id": f"run{night}", "started_at": f"2026-12-0{night + 1}T00:00:00", "machine_key": "driver",
                   "environment": {"hostname": "driver"}, "device": "cpu", "complete": True,
                   "results": [ok_row(fleet[0], 0.1), ok_row(fleet[1], 0.2)]}
        assert store.add_run(payload, "run")
    keys = [r[0] for r in store.db.execute("SELECT machine_key FROM model_results WHERE run_id='run1' ORDER BY rowid")]
    assert keys == ["mk-box#1", "mk-box#2"]
    earlier = store.earlier({**payload, "started_at": "2026-12-09T00:00:00"}, payload["results"][1])
    assert [e["warm_median_sec"] for e in earlier] == [0.2, 0.2]  # node 2's own figures, both nights
    store.close()


def test_a_node_alone_on_its_host_keeps_its_plain_machine_key():
    node = ub.FleetNode(ray_node("a", "h1"), "cpu", False, None, {"machine_key": "mk-h1"})
    row = ub.placed_row({"class_name": "C", "node": {"machine_key": "mk-own"}}, node)
    assert row["node_key"] == "mk-own" and ub.row_machine_key({"machine_key": "driver"}, row) == "mk-own"


# -- the device each row ran on --------------------------------------------------------------------


def test_history_key_and_report_use_each_rows_device():
    """With --device auto on Ray the run's device is cpu (the driver's); rows ran on CUDA."""
    payload = {"device": "cpu", "environment": {"device": "cpu"}, "weights": "random",
               "results": [{"status": "ok", "device": "cuda:0", "mem_kind": "cuda_allocated"},
                           {"status": "ok", "device": "cpu", "mem_kind": "process_rss"},
                           {"status": "ok", "device": "cuda:0", "mem_kind": "cuda_allocated"}]}
    configs = [ub.model_config(payload, {"class_name": "C", **r}) for r in payload["results"]]
    assert [c["device_type"] for c in configs] == ["cuda", "cpu", "cuda"]
    assert ub.devices_text(payload) == "cuda:0 (2 models), cpu (1 model)"
    assert "CUDA allocated memory for the models run on CUDA" in ub.memory_kind_text(payload["results"],
                                                                                     torch.device("cpu"))
    local = {"environment": {"device": "cpu"}, "results": [{"status": "ok", "device": "cpu", "mem_kind": "process_rss"}]}
    assert ub.devices_text(local) == "cpu" and ub.memory_kind_text(local["results"], torch.device("cpu")) == "process RSS"


# -- temporary folders on the nodes -----------------------------------------------------------------


def test_a_runs_folders_go_and_only_dead_old_ones_of_other_runs():
    now, old = time.time(), time.time() - 2 * ub.RAY_LITTER_MIN_AGE_SEC
    entries = [("vision-bench-task-abcd1234-111-x1", now), ("vision-bench-viz-abcd1234-111-x2", now),
               ("vision-bench-task-ffff0000-222-x3", old), ("vision-bench-task-ffff0000-333-x4", old),
               ("vision-bench-task-ffff0000-222-x5", now), ("vision-bench-node-ds8aphwf", old), ("ray", old),
               ("vision-bench-abcd1234", old)]
    removed = ub.ray_temp_litter(entries, "abcd1234", lambda pid: pid == 333, now)
    assert removed == ["vision-bench-task-abcd1234-111-x1", "vision-bench-viz-abcd1234-111-x2",
                       "vision-bench-task-ffff0000-222-x3"]


def test_a_tasks_folder_names_match_what_the_cleanup_looks_for(tmp_path):
    import tempfile

    made = tempfile.mkdtemp(prefix=f"vision-bench-task-abcd1234-{os.getpid()}-", dir=tmp_path)
    assert ub.ray_temp_litter([(Path(made).name, 0.0)], "abcd1234", lambda pid: True, 0.0) == [Path(made).name]


# -- joining a cluster: address and token -----------------------------------------------------------


def test_ray_addresses_are_host_and_port():
    assert ub.ray_host_port("127.0.0.1:6390") == ("127.0.0.1", 6390)
    assert ub.ray_host_port(" head.lan:6379 ") == ("head.lan", 6379)
    assert ub.ray_host_port("[::1]:6379") == ("::1", 6379)
    assert [ub.ray_host_port(a) for a in ("auto", "head.lan", "ray://head:10001", "h:port")] == [None] * 4


def test_the_token_is_found_where_ray_documents_it(tmp_path):
    """RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names (no fallback when it is unreadable),
    else ~/.ray/auth_token."""
    home = tmp_path / "home"
    assert ub.ray_token_source({}, home) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("  \n")
    assert ub.ray_token_source({}, home) is None  # an empty file is no token
    (home / ".ray" / "auth_token").write_text("a" * 64)
    assert ub.ray_token_source({}, home) == str(home / ".ray" / "auth_token")
    (tmp_path / "t").write_text("b" * 64)
    assert ub.ray_token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}, home) == str(tmp_path / "t")
    assert ub.ray_token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, home) is None
    assert ub.ray_token_source({"RAY_AUTH_TOKEN": "c", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}, home) == \
        "RAY_AUTH_TOKEN"


def test_a_refused_driver_is_told_in_one_line_what_to_set():
    for source, env in ((None, {}), ("/root/.ray/auth_token", {}), (None, {"RAY_AUTH_TOKEN_PATH": "/x"})):
        text = ub.ray_auth_advice("10.0.0.1:6379", env, source)
        assert "\n" not in text and "10.0.0.1:6379" in text and "RAY_AUTH_TOKEN" in text
        assert "ray get-auth-token" in text and text.isascii()
    assert "refused the token from /root/.ray/auth_token" in ub.ray_auth_advice("h:1", {}, "/root/.ray/auth_token")
    assert "RAY_AUTH_TOKEN_PATH=/x cannot be read" in ub.ray_auth_advice("h:1", {"RAY_AUTH_TOKEN_PATH": "/x"}, None)


def test_the_node_selector_is_one_ray_accepts():
    label_utils = pytest.importorskip("ray._private.label_utils", reason="ray is in requirements.txt")
    validate_label_selector = label_utils.validate_label_selector

    nodes = [fleet_node(ray_node("a", "h1")), fleet_node(ray_node("b", "h2"))]
    selector = ub.node_selector(nodes)
    assert validate_label_selector(selector) is None, validate_label_selector(selector)
    assert json.dumps(selector).count(nodes[0].node_id) == 1


def test_a_node_runs_as_many_threads_as_it_offers_ray_cpus():
    """Two one-CPU nodes on a 2-core machine: one thread each, not two; --threads always wins;
    a node offering more CPUs than the process may use gets those it may use."""
    assert ub.node_threads(None, 1.0, 2) == 1
    assert ub.node_threads(None, 16.0, 4) == 4
    assert ub.node_threads(None, 2.5, 8) == 2
    assert ub.node_threads(3, 1.0, 2) == 3
    assert ub.node_threads(None, 0.0, 2) is None  # the node said nothing: all usable CPUs, as locally


NORMAL_PRIORITY = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); import unified_benchmark as ub; "
                   "print(json.dumps([*ub.normal_priority(), os.getpriority(os.PRIO_PROCESS, 0)]))")


def test_a_runner_started_at_ray_nice_15_goes_back_to_0_or_says_what_to_do(monkeypatch):
    """Ray starts its workers at nice 15; a node's runner (and the model's worker it starts) goes back
    to 0 where it may (here, as root: a real process started at nice 15), else it runs at 15 and
    names RAY_worker_niceness=0 (the refusal an unprivileged process gets, planted)."""
    if os.geteuid() == 0:
        proc = subprocess.run([sys.executable, "-c", NORMAL_PRIORITY, str(REPO)], capture_output=True, text=True,
                              preexec_fn=lambda: os.nice(15), timeout=120)
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, None, 0], proc.stderr

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ub.os, "getpriority", lambda *args: 15)
    monkeypatch.setattr(ub.os, "setpriority", refuse)
    niceness, advice = ub.normal_priority()
    assert niceness == 15 and "nice 15" in advice and "RAY_worker_niceness=0" in advice
