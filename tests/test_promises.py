"""Promises of the README that only a purpose-built case can prove: the timing split, the per-run
memory peak, the DA-V2 skip rules, default paths from another folder, a worker that segfaults or
exits without a result, a plotting failure."""

import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from conftest import BUS, REPO, load_report, run_cli, run_main, ub, write_yolo_checkpoint


class Timed(ub.ModelBenchmark):
    """A small real network whose three phases sleep known times; forward can plant an allocation."""

    MODEL_NAME, SHORT_NAME, INPUT_SIZE, LIBRARY, PREPROCESS_NOTE = "Timed", "timed", 32, "torch", "sleeps"
    PRE_SEC, FORWARD_SEC, POST_SEC = 0.2, 0.6, 0.4
    plant_mb = 0

    def requirements(self):
        return []

    def pretrained_source(self):
        return "none"

    def _load_pretrained(self):
        return self._build_random()

    def _build_random(self):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())

    def preprocess(self, image):
        time.sleep(self.PRE_SEC)
        return torch.rand(1, 3, 32, 32)

    def forward(self, inputs):
        time.sleep(self.FORWARD_SEC)
        if self.plant_mb:
            planted = np.ones(self.plant_mb * 2**20 // 8)  # touched: resident, then freed
            del planted
        return self.model(inputs)

    def postprocess(self, outputs, image):
        time.sleep(self.POST_SEC)
        return outputs


def test_latency_is_the_forward_alone_with_pre_and_postprocessing_apart(bus_image, cpu):
    bench = Timed(cpu, "random")
    bench.load()
    for _ in range(2):
        run = bench.infer(bus_image)
        # Each figure holds its own phase's sleep and not the others' (a slack of 0.15 s for the
        # real work around the sleeps, on a slow machine too: the phases differ by 0.2 s or more).
        assert Timed.PRE_SEC <= run["preprocess_sec"] < Timed.PRE_SEC + 0.15, run
        assert Timed.FORWARD_SEC <= run["inference_sec"] < Timed.FORWARD_SEC + 0.15, run
        assert Timed.POST_SEC <= run["postprocess_sec"] < Timed.POST_SEC + 0.15, run


def test_the_per_run_peak_catches_an_allocation_inside_a_run(bus_image, cpu):
    bench = Timed(cpu, "random")
    bench.load()
    bench.PRE_SEC = bench.FORWARD_SEC = bench.POST_SEC = 0
    quiet = bench.infer(bus_image)["peak_rss_mb"]
    bench.plant_mb = 512
    planted = bench.infer(bus_image)["peak_rss_mb"]
    bench.plant_mb = 0
    after = bench.infer(bus_image)["peak_rss_mb"]  # the peak is reset per run, not the process's lifetime
    assert planted - quiet > 480 and planted - after > 480, (quiet, planted, after)


def test_an_unavailable_dav2_is_skipped_exit_0_and_all_skipped_is_exit_2(tmp_path, one_image_dir):
    models = tmp_path / "models"
    models.mkdir()
    write_yolo_checkpoint(ub.YOLO11nDetectBenchmark, models / "yolo11n.pt")
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    args = ["--runs", "1", "--no-dissect", "--no-history", "--models-dir", models, "--images", one_image_dir,
            "--output-dir", tmp_path / "out"]
    proc = run_cli("--models", "dav2-small,yolo11n-detect", *args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = load_report(tmp_path / "out")["results"]
    assert [(r["class_name"], r["status"]) for r in rows] == [
        ("DepthAnythingV2SmallBenchmark", "skipped"), ("YOLO11nDetectBenchmark", "ok")]
    assert "Depth-Anything-V2-Small-hf" in rows[0]["error"]
    proc = run_cli("--models", "dav2-small,dav2-base", *args, env=env)
    assert proc.returncode == 2 and "every selected model would be skipped" in proc.stdout


def test_defaults_resolve_against_the_script_folder_from_another_working_directory(tmp_path):
    """cron runs from anywhere: test_data/ and models/ are the script's, never the working directory's."""
    (tmp_path / "test_data").mkdir()
    shutil.copy(BUS, tmp_path / "test_data" / "bus.jpg")  # a decoy: must not be used
    (tmp_path / "models").mkdir()
    write_yolo_checkpoint(ub.YOLO11nDetectBenchmark, tmp_path / "models" / "yolo11n.pt")  # a decoy too
    proc = subprocess.run([sys.executable, str(REPO / "unified_benchmark.py"), "--models", "yolo11n-detect",
                           "--list"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and str(REPO / "models" / "yolo11n.pt") in proc.stdout, proc.stdout
    images = list((REPO / "test_data").glob("*.jpg")) + list((REPO / "test_data").glob("*.png"))
    proc = subprocess.run([sys.executable, str(REPO / "unified_benchmark.py"), "--weights", "random", "--models",
                           "yolo11n-detect", "--runs", "1", "--no-dissect", "--no-history", "--output-dir", "out"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    used = load_report(tmp_path / "out")["images"]
    assert not any(p.startswith(str(tmp_path)) for p in used), used
    if images:  # the script's own images were used
        assert all(p.startswith(str(REPO / "test_data")) for p in used)
    else:  # the script's test_data/ is empty: said so by its path, and the sample photos used instead
        assert f"No image in {REPO / 'test_data'}" in proc.stdout, proc.stdout
    assert not (tmp_path / "results").exists()  # a relative --output-dir is the working directory's


class Crash:
    """A weight file whose unpickling runs code (Ultralytics loads .pt files with full unpickling)."""

    def __init__(self, call):
        self.call = call

    def __reduce__(self):
        return self.call


def test_a_worker_that_segfaults_or_exits_without_a_result_is_one_crashed_row(tmp_path, one_image_dir):
    import ctypes

    models = tmp_path / "models"
    models.mkdir()
    with open(models / "yolo11n.pt", "wb") as f:  # dereferences address 0 in the worker: SIGSEGV
        pickle.dump(Crash((ctypes.string_at, (0,))), f)
    with open(models / "yolo11n-pose.pt", "wb") as f:
        pickle.dump(Crash((os._exit, (3,))), f)
    write_yolo_checkpoint(ub.YOLO11nSegmentBenchmark, models / "yolo11n-seg.pt")
    proc = run_cli("--models", "yolo11n-detect,yolo11n-pose,yolo11n-seg", "--runs", "1", "--no-dissect", "--no-history",
                   "--keep-going", "--models-dir", models, "--images", one_image_dir, "--output-dir", tmp_path / "out")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    detect, pose, seg = load_report(tmp_path / "out")["results"]
    assert detect["status"] == "crashed" and detect["worker_signal"] == "SIGSEGV" and detect["failed_phase"] == "load"
    assert "killed by SIGSEGV" in detect["error"]
    assert pose["status"] == "crashed" and pose["worker_exit_code"] == 3 and pose["worker_signal"] is None
    assert "exited with code 3 without a result" in pose["error"]
    assert seg["status"] == "ok"  # the next model ran, in a fresh worker


def test_a_plotting_failure_is_a_warning_and_the_reports_are_written(tmp_path, one_image_dir, capsys, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def broken(*args, **kwargs):
        raise RuntimeError("the Agg backend is broken")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", broken)  # what every PNG the program draws goes through
    code, text = run_main(capsys, "--weights", "random", "--models", "yolo11n-detect", "--runs", "2", "--no-dissect",
                          "--images", one_image_dir, "--output-dir", tmp_path)
    assert code == 0, text
    assert "[WARNING] Plots were not all written (RuntimeError: the Agg backend is broken)" in text
    report = load_report(tmp_path)
    assert report["results"][0]["status"] == "ok" and report["plots"] == []
    assert len(list((tmp_path / "results").glob("benchmark_*"))) == 3
