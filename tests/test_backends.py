"""--backend: the forward exported to ONNX, run by ONNX Runtime and OpenVINO, with its accuracy cost."""

import json
import os
import re
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_report, run_main, ub

ORT = ["--weights", "random", "--runs", "2", "--no-dissect", "--isolation", "none", "--backend", "onnxruntime"]


def only_row(out: Path) -> dict:
    (row,) = load_report(out)["results"]
    return row


def test_what_a_backend_refuses_and_why():
    cpu = ub.RunOptions(backend="onnxruntime")
    assert ub.backend_problem(["torch"], "cuda", ub.RunOptions(compile="default")) is None
    assert ub.backend_problem(["onnxruntime"], "cpu", cpu) is None
    assert "needs a CUDA device" in ub.backend_problem(["torch", "tensorrt"], "cpu", ub.RunOptions())
    assert ub.backend_problem(["torch", "onnxruntime", "tensorrt"], "cuda", ub.RunOptions()) is None
    assert "add --device cpu" in ub.backend_problem(["onnxruntime", "openvino"], "cuda", ub.RunOptions())
    both = ub.backend_problem(["onnxruntime"], "cpu", ub.RunOptions(compile="default", dtype="bf16"))
    assert both.startswith("--compile, --dtype bf16 are PyTorch options") and "add torch to --backend" in both
    # Beside a torch row they apply to it alone, and the runtime's row says so.
    assert ub.backend_problem(["torch", "onnxruntime"], "cpu", ub.RunOptions(compile="default")) is None
    options, notes = ub.backend_options(ub.RunOptions(compile="default", channels_last=True, fuse=True), "onnxruntime")
    assert (options.backend, options.compile, options.channels_last, options.dtype, options.fuse) == (
        "onnxruntime", None, False, "fp32", True)  # --fuse changes the module that is exported: it applies
    assert notes == ["--compile, --channels-last: applied to the torch rows only; onnxruntime runs the model "
                     "exported in float32"]
    assert ub.backend_options(ub.RunOptions(compile="default"), "torch")[0].compile == "default"
    # The backend is part of the history's configuration key; torch, the default, is not written out.
    assert ub.RunOptions(backend="openvino").key(2) == {"backend": "openvino"} and ub.RunOptions().key(2) == {}


def test_onnxruntime_runs_on_the_rows_device_with_the_right_providers(tmp_path):
    """The provider chain and its device index follow the row's device: cuda:1 is CUDA's ordinal 1
    (as torch's, under CUDA_VISIBLE_DEVICES too); TensorRT is first, CUDA behind it, the CPU last."""
    assert ub.ort_providers("onnxruntime", torch.device("cpu"), None) == [("CPUExecutionProvider", {})]
    assert ub.ort_providers("onnxruntime", torch.device("cuda", 1), None) == [
        ("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "1"}), ("CPUExecutionProvider", {})]
    trt = ub.ort_providers("tensorrt", torch.device("cuda", 0), tmp_path)
    assert [name for name, _ in trt] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert trt[0][1]["device_id"] == "0" and trt[0][1]["trt_engine_cache_path"] == str(tmp_path)
    assert trt[0][1]["trt_engine_cache_enable"] == "True" and trt[0][1]["trt_timing_cache_path"] == str(tmp_path)


def test_a_gpu_provider_this_onnxruntime_lacks_is_a_preflight_problem():
    """The CPU wheel installed here offers no CUDA provider: a CUDA row of it is refused before
    anything runs, naming onnxruntime-gpu; a session that dropped its GPU provider is a failed load."""
    import onnxruntime as ort

    here = ort.get_available_providers()
    assert "CUDAExecutionProvider" not in here and ub.provider_problem("onnxruntime", "cpu", here) is None
    assert "pip install onnxruntime-gpu" in ub.provider_problem("onnxruntime", "cuda", here)
    gpu_wheel = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ub.provider_problem("onnxruntime", "cuda", gpu_wheel) is None
    assert "TensorrtExecutionProvider" in ub.provider_problem("tensorrt", "cuda", gpu_wheel)
    assert ub.provider_fallback_problem("CUDAExecutionProvider", gpu_wheel) is None
    assert "every node would run on the CPU" in ub.provider_fallback_problem("CUDAExecutionProvider", here)


def test_what_cpp_code_prints_is_kept_off_the_console_and_the_descriptors_come_back(capfd):
    """quiet_fds: what C++ code writes on fd 1 (the TorchScript exporter's graph dump) or fd 2
    (Ray's client) is dropped for the span; the descriptors are restored, an exception or not."""
    with pytest.raises(RuntimeError):
        with ub.quiet_fds(1, 2):
            os.write(1, b"graph dump\n"), os.write(2, b"client warning\n")
            raise RuntimeError("inside the span")
    os.write(1, b"after on 1\n"), os.write(2, b"after on 2\n")
    captured = capfd.readouterr()
    assert "graph dump" not in captured.out and "client warning" not in captured.err
    assert "after on 1" in captured.out and "after on 2" in captured.err


def test_nodes_left_on_the_cpu_are_counted_when_a_gpu_provider_was_asked_for():
    assignment = [("CUDAExecutionProvider", ["Conv", "Relu", "Conv"]), ("CPUExecutionProvider", ["Shape", "Gather"]),
                  ("CUDAExecutionProvider", ["Add"]), ("CPUExecutionProvider", ["Shape"])]
    found = ub.node_placement(assignment, "CUDAExecutionProvider")
    assert found["runtime_nodes_by_provider"] == {"CUDAExecutionProvider": 4, "CPUExecutionProvider": 3}
    assert found["runtime_cpu_nodes"] == 3 and found["runtime_cpu_node_ops"] == {"Shape": 2, "Gather": 1}
    cpu = ub.node_placement([("CPUExecutionProvider", ["Conv", "Shape"])], "CPUExecutionProvider")
    assert cpu["runtime_cpu_nodes"] is None and cpu["runtime_nodes_by_provider"] == {"CPUExecutionProvider": 2}
    # the log line and the report's Nodes cell say the same, from one place
    assert ub.node_placement_text(found) == ("4 on CUDAExecutionProvider, 3 on CPUExecutionProvider",
                                             "3 node(s) (Shape x2, Gather x1)")
    assert ub.placement_text(found).endswith("; **left on the CPU: 3 node(s) (Shape x2, Gather x1)**")
    assert ub.placement_text(cpu) == "2 on CPUExecutionProvider" and ub.placement_text({}) == "n/a"


def test_runtimes_on_cuda_are_labelled_and_judged_as_tf32():
    """ONNX Runtime's CUDA provider (use_tf32, its default) and TensorRT run float32 as TF32: the
    MFU's peak is TF32's and the accuracy is judged by the reduced set; torch and the CPU as before."""
    assert ub.runtime_tf32("onnxruntime", "cuda") == ub.runtime_tf32("tensorrt", "cuda") == {"conv": True, "matmul": True}
    assert ub.runtime_tf32("torch", "cuda") is None and ub.runtime_tf32("onnxruntime", "cpu") is None
    assert ub.parity_threshold_set(ub.RunOptions(backend="onnxruntime"), "cuda") == "reduced"
    assert ub.parity_threshold_set(ub.RunOptions(backend="onnxruntime"), "cpu") == "fp32"
    assert ub.parity_threshold_set(ub.RunOptions(compile="default"), "cuda") == "fp32"
    assert ub.class_precisions("cuda", "fp32", ub.runtime_tf32("tensorrt", "cuda")) == {"conv": "tf32", "matmul": "tf32"}


def test_a_missing_nvml_figure_says_why():
    assert ub.nvml_memory_note("gpu_process_nvml", "ok", 812.0) is None
    assert ub.nvml_memory_note("cuda_allocated", "n/a: not installed", None) is None  # not NVML's figure
    assert ub.nvml_memory_note("gpu_process_nvml", "n/a: ModuleNotFoundError", None).endswith("n/a: ModuleNotFoundError")
    assert "cannot be told apart" in ub.nvml_memory_note("gpu_process_nvml", "ok", None)


def test_tensorrt_engines_are_kept_per_export_and_gpu(tmp_path):
    facts = {"onnxruntime": "1.32.0", "tensorrt": "10.9", "gpu": "NVIDIA H200", "capability": "9.0"}
    export = str(tmp_path / "exports" / "YOLO11nDetectBenchmark-0123456789abcdef" / "model.onnx")
    folder = ub.engine_folder(tmp_path / "engines", export, facts)
    assert folder.parent == tmp_path / "engines" and folder.name.startswith("YOLO11nDetectBenchmark-0123456789abcdef-")
    assert ub.engine_folder(tmp_path / "engines", export, facts) == folder
    for change in ({"gpu": "NVIDIA L4"}, {"capability": "8.9"}, {"onnxruntime": "1.33.0"}, {"tensorrt": "10.10"}):
        assert ub.engine_folder(tmp_path / "engines", export, {**facts, **change}) != folder, change
    engines = {"a.engine": (900, 1), "a.profile": (40, 1)}
    assert ub.engine_cache_hit(engines, dict(engines))
    assert not ub.engine_cache_hit({}, {"a.engine": (900, 1)})
    assert not ub.engine_cache_hit(engines, {**engines, "b.engine": (700, 2)})  # a new shape's engine
    assert not ub.engine_cache_hit(engines, {**engines, "a.engine": (900, 2)})  # rebuilt in place, same name
    (tmp_path / "engines" / "x" / "sub").mkdir(parents=True)
    (tmp_path / "engines" / "x" / "sub" / "e.engine").write_bytes(b"12")
    (found,) = ub.folder_files(tmp_path / "engines" / "x").items()
    assert found[0] == "sub/e.engine" and found[1][0] == 2 and ub.folder_files(None) == {}


def test_a_node_reports_the_backends_it_cannot_run(tmp_path):
    """What a Ray task runs on each node before a run (--node-preflight), as a real process:
    tensorrt on a node without CUDA is its problem; onnxruntime and openvino there are not."""
    import subprocess

    def ask(backends: list[str]) -> list[str]:
        request = json.dumps({"models": "yolo11n-detect", "weights": "random", "models_dir": str(tmp_path),
                              "backends": backends, "device": "auto"})
        proc = subprocess.run([sys.executable, str(ub.SCRIPT_DIR / "unified_benchmark.py"), "--node-preflight", request],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])["backend_problems"]

    assert ask(["torch", "onnxruntime", "openvino"]) == []
    (problem,) = ask(["torch", "tensorrt"])
    assert "--backend tensorrt needs a CUDA device" in problem
    assert ub.node_backend_problems(["openvino"], "cuda:7")[0].startswith("--device cuda:7: CUDA is not available")


def test_backend_lists_parse_in_order_and_refuse_what_is_not_one():
    import argparse

    assert ub.parse_backends("torch, onnxruntime,openvino") == ["torch", "onnxruntime", "openvino"]
    for bad, says in (("torch,onnx", "unknown backend(s) onnx"), ("torch,torch", "named twice"), (",", "unknown")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
            ub.parse_backends(bad)


def test_a_row_key_keeps_runs_from_before_backends_comparable():
    """The history's configuration key of a row: its own backend; PyTorch's options left out of a
    runtime's row (they did not apply); a torch row's key as before --backend existed."""
    run_options = {"compile": "default", "fuse": True}
    assert ub.row_options_key(run_options, {"runtime": "torch"}) == run_options
    assert ub.row_options_key(run_options, {}) == run_options  # a row from before --backend
    assert ub.row_options_key(run_options, {"runtime": "openvino"}) == {"fuse": True, "backend": "openvino"}
    # A run of the last version stored its single backend in the run's options.
    assert ub.row_options_key({"backend": "onnxruntime"}, {"runtime": "onnxruntime"}) == {"backend": "onnxruntime"}


def test_speedups_are_against_the_first_backends_row_of_the_same_model():
    rows = [{"class_name": "A", "status": "ok", "runtime": "torch", "warm_median_sec": 0.3},
            {"class_name": "A", "status": "ok", "runtime": "onnxruntime", "warm_median_sec": 0.1},
            {"class_name": "B", "status": "failed", "runtime": "torch"},
            {"class_name": "B", "status": "ok", "runtime": "onnxruntime", "warm_median_sec": 0.2},
            {"class_name": "A", "status": "ok", "runtime": "onnxruntime", "warm_median_sec": 0.6, "node_label": "n2"}]
    got = [r["speedup_vs_baseline"] for r in ub.with_speedups(rows, ["torch", "onnxruntime"])]
    assert got == [pytest.approx(1.0), pytest.approx(3.0), None, None, None]  # n2 has no torch row of its own
    assert {r["baseline_backend"] for r in rows} == {"torch"}


def test_outputs_rebuilt_from_the_skeleton_keep_their_structure():
    from transformers.modeling_outputs import DepthEstimatorOutput

    depth = DepthEstimatorOutput(predicted_depth=torch.ones(1, 4, 4))
    nested = (torch.zeros(2), [torch.ones(3), torch.full((1,), 2.0)], None)
    for value in (depth, nested, {"a": torch.ones(1), "b": 3}):
        leaves: list = []
        skeleton = json.loads(json.dumps(ub.output_skeleton(value, leaves)))  # as stored in export.json
        rebuilt = ub.rebuild_outputs(skeleton, [t * 10 for t in leaves])
        assert type(rebuilt) is type(value)
        assert [t.tolist() for t in ub.output_tensors(rebuilt)] == [(t * 10).tolist() for t in ub.output_tensors(value)]
    assert ub.rebuild_outputs(ub.output_skeleton(nested, []), [torch.zeros(2), torch.ones(3), torch.ones(1)])[2] is None


def test_a_missing_backend_package_is_exit_2_naming_it(tmp_path, capsys, one_image_dir, monkeypatch):
    """Every backend's missing package is named in the one message, so that one pass fixes them all."""
    for name in ("openvino", "onnx"):
        monkeypatch.setitem(sys.modules, name, None)  # what Python does for a package it cannot import
    code, text = run_main(capsys, *ORT[:-1], "torch,openvino,onnxruntime", "--models", "yolo11n-detect",
                          "--images", one_image_dir, "--output-dir", tmp_path)
    assert code == ub.EXIT_USAGE and "found 2 problem(s)" in text, text
    assert "--backend openvino needs the Python package(s) onnx, openvino" in text and "pip install onnx openvino" in text
    assert "--backend onnxruntime needs the Python package(s) onnx" in text
    assert not list(tmp_path.rglob("benchmark_results_*.json"))  # nothing was run


def test_tensorrt_on_the_cpu_is_refused(tmp_path, capsys, one_image_dir):
    code, text = run_main(capsys, *ORT[:-1], "tensorrt", "--device", "cpu", "--models", "yolo11n-detect",
                          "--images", one_image_dir, "--output-dir", tmp_path)
    assert code == ub.EXIT_USAGE and "--backend tensorrt needs a CUDA device" in text, text


def test_onnxruntime_exports_once_reuses_the_export_and_redoes_a_corrupt_one(tmp_path, capsys, one_image_dir):
    """YOLO11n detect on ONNX Runtime three times with one models folder: exported, then the cached
    export, then (its file truncated) exported again; every time parity 'ok' against fp32 PyTorch."""
    args = [*ORT, "--models", "yolo11n-detect", "--images", one_image_dir, "--models-dir", tmp_path / "models"]
    rows = []
    for run in range(3):
        code, text = run_main(capsys, *args, "--output-dir", tmp_path / f"out{run}")
        assert code == 0, text
        rows.append(only_row(tmp_path / f"out{run}"))
        if run == 1:  # truncate the cached model, as a full disk or a killed copy leaves it
            onnx_file = Path(rows[1]["export_path"])
            onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    assert [r["export_cached"] for r in rows] == [False, True, False]
    assert rows[2]["export_note"].startswith("the cached model.onnx is truncated or corrupt") and "exported again" in text
    for row in rows:
        assert row["runtime"] == "onnxruntime" and row["status"] == "ok" and row["parity"] == "ok", row.get("parity")
        assert row["parity_rel_l2_max"] < 1e-4 and row["export_exporter"] == "torchscript" and row["export_opset"] == 17
        assert row["export_mb"] > 5 and row["export_sec"] > 0 and row["load_time_sec"] > 0 and row["torch_load_sec"] > 0
        assert row["runtime_settings"]["providers"] == ["CPUExecutionProvider"] and len(row["runs"]) == 2
        assert row["runtime_settings"]["io_binding"] == "cpu:0" and row["runtime_device"] == "CPU"
        (placed,) = row["runtime_nodes_by_provider"].items()  # every node of the graph, on the CPU's provider
        assert placed[0] == "CPUExecutionProvider" and placed[1] > 50 and row["runtime_cpu_nodes"] is None
        assert all(r["inference_event_sec"] is None for r in row["runs"])
        assert row["gflops"] > 1 and row["warm_median_sec"] > 0 and row["mem_kind"] == "process_rss"
    assert rows[0]["export_path"] == rows[1]["export_path"] and "[EXPORT] ONNX export (torchscript exporter" in text


def test_a_model_whose_export_fails_is_one_failed_row(tmp_path, capsys, one_image_dir):
    """The exports folder cannot be made (a file is in its place): that model's row fails in the
    export phase with the reason, and --keep-going runs the next one."""
    models = tmp_path / "models"
    models.mkdir()
    (models / ub.EXPORTS_DIR_NAME).write_text("not a folder")
    code, text = run_main(capsys, *ORT, "--models", "yolo11n-detect,yolo11n-pose", "--keep-going",
                          "--images", one_image_dir, "--models-dir", models, "--output-dir", tmp_path / "out")
    rows = load_report(tmp_path / "out")["results"]
    assert code == ub.EXIT_MODEL_FAILED, text
    assert [(r["status"], r["failed_phase"]) for r in rows] == [("failed", "export"), ("failed", "export")]
    assert "during export: OutputError: cannot write the ONNX export under" in rows[0]["error"] and str(models / ub.EXPORTS_DIR_NAME) in rows[0]["error"]


@pytest.mark.slow
def test_openvino_runs_yolo_and_depth_anything_with_parity_ok(tmp_path, capsys, one_image_dir):
    code, text = run_main(capsys, *ORT[:-1], "openvino", "--models", "yolo11n-detect,dav2-small",
                          "--images", one_image_dir, "--models-dir", tmp_path / "models", "--output-dir", tmp_path)
    assert code == 0, text
    rows = load_report(tmp_path)["results"]
    assert [r["parity"] for r in rows] == ["ok", "ok"], [(r.get("parity"), r.get("parity_rel_l2_max")) for r in rows]
    for row in rows:
        assert row["runtime"] == "openvino" and row["runtime_device"] == "CPU"
        assert row["runtime_settings"]["PERFORMANCE_HINT"] == "LATENCY"
        assert row["runtime_settings"]["INFERENCE_PRECISION_HINT"] == "f32"


@pytest.mark.slow
def test_all_eight_models_run_on_onnxruntime_with_parity_ok(tmp_path):
    """Every model exported and run on ONNX Runtime in its worker (DepthPro in the reduced
    configuration the tests use), each within the fp32 parity thresholds."""
    from conftest import BUS, run_cli

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bus.jpg").write_bytes(BUS.read_bytes())
    proc = run_cli("--weights", "random", "--runs", "1", "--no-dissect", "--backend", "onnxruntime",
                   "--images", tmp_path / "images", "--models-dir", tmp_path / "models", "--output-dir", tmp_path / "out",
                   "--keep-going", timeout=1500)
    rows = load_report(tmp_path / "out")["results"]
    found = {r["class_name"]: (r["status"], r.get("parity"), r.get("parity_rel_l2_max")) for r in rows}
    assert proc.returncode == 0 and len(rows) == 8, (found, proc.stdout[-3000:], proc.stderr[-3000:])
    assert all(status == "ok" and parity == "ok" for status, parity, _ in found.values()), found
    # MobileSAM's TorchScript export fails (then the dynamo exporter's is used): the exporter's dump
    # of the whole graph, printed by its C++ code, is not on the console
    assert "Torch IR graph" not in proc.stdout + proc.stderr and "dynamo exporter was used" in proc.stdout


def test_a_backend_list_is_a_row_per_model_and_backend_stored_and_judged_apart(tmp_path, capsys, one_image_dir):
    """--backend torch,onnxruntime twice, in worker processes, with the history: two rows in the
    given order, speed-ups against the torch row, the dissection once (in the torch row), both rows
    stored; the second run's --channels-last is the torch row's alone, so only the onnxruntime row
    finds an earlier run of its configuration."""
    args = ["--weights", "random", "--runs", "2", "--backend", "torch,onnxruntime", "--models", "yolo11n-detect",
            "--images", one_image_dir, "--models-dir", tmp_path / "models", "--output-dir", tmp_path / "out"]
    code, text = run_main(capsys, *args)
    assert code == 0, text
    first = load_report(tmp_path / "out")
    torch_row, ort_row = first["results"]
    assert (torch_row["runtime"], ort_row["runtime"]) == ("torch", "onnxruntime") and first["backends"] == ["torch", "onnxruntime"]
    assert ort_row["speedup_vs_baseline"] == pytest.approx(torch_row["warm_median_sec"] / ort_row["warm_median_sec"])
    assert torch_row["speedup_vs_baseline"] == pytest.approx(1.0) and ort_row["parity"] == "ok"
    assert torch_row["total_layers_dissected"] > 0 and ort_row["total_layers_dissected"] == 0
    assert "dissected in its torch row (the same PyTorch module)" in ort_row["notes"]
    assert "[2/2] YOLO11nDetectBenchmark:onnxruntime" in text
    md = next((tmp_path / "out" / "results").glob("benchmark_report_*.md")).read_text()
    assert "| YOLO11n-Detect | onnxruntime |" in md.split("## Backends")[1] and "Speed-up vs torch" in md

    code, text = run_main(capsys, *args, "--channels-last", "--no-dissect")
    assert code == 0, text
    second = load_report(tmp_path / "out")
    assert second["run_id"] != first["run_id"]
    torch_row, ort_row = second["results"]
    assert torch_row["channels_last"] is True and ort_row["channels_last"] is False
    assert "--channels-last: applied to the torch rows only; onnxruntime runs the model exported in float32" in ort_row["notes"]
    db = sqlite3.connect(tmp_path / "out" / "results" / "history.sqlite")
    stored = db.execute("SELECT run_id, backend FROM model_results ORDER BY rowid").fetchall()
    assert stored == [(first["run_id"], "torch"), (first["run_id"], "onnxruntime"),
                      (second["run_id"], "torch"), (second["run_id"], "onnxruntime")]
    baselines = dict(db.execute("SELECT backend, baseline_runs FROM verdicts WHERE run_id=? AND metric='warm latency'",
                                (second["run_id"],)).fetchall())
    assert baselines == {"torch": 0, "onnxruntime": 1}
    db.close()
