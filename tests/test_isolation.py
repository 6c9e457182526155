"""A worker process per model: real children, real signals, phases, per-image statistics, noise."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (BUS, REPO, ZIDANE, load_report, read_until, run_main, start_cli, start_hog, ub,
                      write_yolo_checkpoint)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def worker_pid(proc, lines, class_name: str) -> int:
    return int(read_until(proc, rf"Worker process (\d+) started for {class_name}", lines).group(1))


# -- a worker that dies or hangs is one row ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("keep_going", [True, False])
def test_sigkilled_worker_is_one_crashed_row(tmp_path, one_image_dir, keep_going):
    """SIGKILL (what the kernel's OOM killer sends) to the real worker in the middle of model 2 of 3."""
    out = tmp_path / "out"
    proc = start_cli("--weights", "random", "--models", "yolo11n-detect,mobilesam,yolo11n-pose", "--runs", "8",
                     "--no-dissect", "--images", one_image_dir, "--output-dir", out,
                     *(["--keep-going"] if keep_going else []))
    lines: list[str] = []
    try:
        pid = worker_pid(proc, lines, "MobileSAMBenchmark")
        read_until(proc, r"\[INFER 1/8\]", lines)
        os.kill(pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 1, text
    report = load_report(out)
    rows = report["results"]
    assert [r["status"] for r in rows] == (["ok", "crashed", "ok"] if keep_going else ["ok", "crashed"])
    crashed = rows[1]
    assert crashed["class_name"] == "MobileSAMBenchmark" and crashed["worker_signal"] == "SIGKILL"
    assert crashed["failed_phase"] == "inference" and crashed["failed_image"] == "bus.jpg"
    assert "SIGKILL" in crashed["error"] and "out-of-memory killer" in crashed["error"]
    assert crashed["last_peak_rss_mb"] > 100
    assert any("[INFER 1/8]" in line for line in crashed["last_log_lines"])
    assert report["complete"] is keep_going
    md = next((out / "results").glob("*.md")).read_text(encoding="utf-8")
    row_line = next(line for line in md.splitlines() if line.startswith("| MobileSAMBenchmark | crashed"))
    assert "SIGKILL" in row_line and row_line.endswith("|")
    assert ("INCOMPLETE RUN" in md) is not keep_going
    assert not pid_alive(pid)


@pytest.mark.slow
def test_hung_worker_is_stopped_at_the_model_timeout(tmp_path, one_image_dir):
    """A real hang: the worker is frozen with SIGSTOP mid-inference; --model-timeout stops it. The
    healthy second model (its random checkpoint built beforehand; worker imports, load, 3 runs,
    FLOPs counted: under 3 s here, 7.5 s beside two CPU hogs) has twice the worst of that in hand."""
    out = tmp_path / "out"
    ub.prepare_random_checkpoint(ub.YOLO11nPoseBenchmark, "random", tmp_path)  # cached for the run's worker
    proc = start_cli("--weights", "random", "--models", "yolo11n-detect,yolo11n-pose", "--runs", "3",
                     "--no-dissect", "--keep-going", "--model-timeout", "15", "--images", one_image_dir,
                     "--output-dir", out)
    lines: list[str] = []
    pid = None
    try:
        pid = worker_pid(proc, lines, "YOLO11nDetectBenchmark")
        read_until(proc, r"\[INFER 1/3\]", lines)
        os.kill(pid, signal.SIGSTOP)
        rest, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert proc.returncode == 1, text
    assert "passed --model-timeout 15s during inference on image bus.jpg" in text
    rows = load_report(out)["results"]
    assert [r["status"] for r in rows] == ["timed_out", "ok"]
    assert rows[0]["failed_phase"] == "inference" and rows[0]["worker_signal"] == "SIGKILL"
    assert not pid_alive(pid)


# -- phases and the cold run ------------------------------------------------------------


def test_the_module_call_counter_sees_a_builder_forward():
    """The counter the runs rely on is not blind: Ultralytics' builder runs a forward."""
    with ub.ModuleCallCounter() as calls:
        ub.YOLO11nDetectBenchmark(torch.device("cpu"), "random")._build_random()
    assert calls.count > 100


@pytest.mark.slow
def test_no_model_forward_before_the_cold_run_random_weights(eight_models):
    """All eight models with random weights, each in its worker: zero module calls before the cold run."""
    code, text, report = eight_models
    assert code == 0, text
    rows = report["results"]
    assert [r["class_name"] for r in rows] == [c.__name__ for c in ub.MODEL_REGISTRY]
    for row in rows:
        assert row["status"] == "ok" and row["isolation"] == "process"
        assert row["module_calls_before_cold_run"] == 0, row["class_name"]
        assert row["downloaded"] is False and row["download_sec"] >= 0
        assert row["runtime_init_sec"] > 0 and row["import_sec"] > 0 and row["load_time_sec"] > 0
    # The three YOLO models' builder ran in a short-lived process: now, or in an earlier run of the session.
    assert (text.count("Seeded random weights built and saved by a short-lived process")
            + text.count("Seeded random weights from the cache")) == 3


def test_random_checkpoints_are_built_once_and_cached_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ub.CACHE_ENV, str(tmp_path / "cache"))
    cls = ub.YOLO11nPoseBenchmark
    first = ub.prepare_random_checkpoint(cls, "random", tmp_path)
    assert "built and saved by a short-lived process" in capsys.readouterr().out
    second = ub.prepare_random_checkpoint(cls, "random", tmp_path)
    assert "from the cache" in capsys.readouterr().out
    assert second == ub.random_checkpoint_cache(cls) and second.read_bytes() == first.read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [second.name]  # no temporary file left
    monkeypatch.setenv(ub.REDUCED_CONFIG_ENV, "0")  # anything the build depends on: another file
    assert ub.random_checkpoint_cache(cls) != second
    assert ub.prepare_random_checkpoint(cls, "pretrained", tmp_path) is None


def test_no_model_forward_before_the_cold_run_pretrained_weights(tmp_path, one_image_dir, capsys):
    """Pretrained Ultralytics checkpoints (the transformers ones: test_models' HF-cache test)."""
    from ultralytics.models.sam.build import build_mobile_sam

    models = tmp_path / "models"
    models.mkdir()
    write_yolo_checkpoint(ub.YOLO11nSegmentBenchmark, models / "yolo11n-seg.pt")
    torch.save(build_mobile_sam().state_dict(), models / "mobile_sam.pt")
    code, text = run_main(capsys, "--models", "yolo11n-seg,mobilesam", "--runs", "1", "--no-dissect",
                          "--models-dir", models, "--images", one_image_dir, "--output-dir", tmp_path / "out")
    assert code == 0, text
    for row in load_report(tmp_path / "out")["results"]:
        assert row["weights"] == "pretrained" and row["module_calls_before_cold_run"] == 0
        assert row["downloaded"] is False


def test_isolation_none_runs_in_this_process_and_says_so(tmp_path, one_image_dir, capsys):
    code, text = run_main(capsys, "--weights", "random", "--models", "yolo11n-detect,yolo11n-pose", "--runs", "2",
                          "--no-dissect", "--isolation", "none", "--images", one_image_dir, "--output-dir", tmp_path)
    assert code == 0, text
    assert "Worker process" not in text
    report = load_report(tmp_path)
    assert report["isolation"] == "none"
    assert [(r["status"], r["isolation"], r["module_calls_before_cold_run"]) for r in report["results"]] == [
        ("ok", "none", 0), ("ok", "none", 0)]
    md = next((tmp_path / "results").glob("*.md")).read_text(encoding="utf-8")
    assert "Isolation: **none**" in md


# -- statistics per image ---------------------------------------------------------------


@pytest.mark.slow
def test_per_image_cold_and_warm_on_two_images_of_different_shape(tmp_path, two_image_dir, capsys):
    """DA-V2 keeps the aspect ratio: bus.jpg (portrait) and zidane.jpg (landscape) are two input shapes."""
    code, text = run_main(capsys, "--weights", "random", "--models", "dav2-base,yolo11n-detect", "--runs", "3",
                          "--no-dissect", "--images", two_image_dir, "--output-dir", tmp_path)
    assert code == 0, text
    dav2, yolo = load_report(tmp_path)["results"]
    per_image = dav2["per_image"]
    assert [i["image"] for i in per_image] == ["bus.jpg", "zidane.jpg"]
    assert per_image[0]["input_shape"] != per_image[1]["input_shape"]
    for info in per_image:
        mine = [r for r in dav2["runs"] if r["image"] == info["image"]]
        assert info["cold_sec"] == mine[0]["inference_sec"] and info["warm_samples"] == 2
        assert info["warm_median_sec"] == pytest.approx(sum(r["inference_sec"] for r in mine[1:]) / 2)
        assert all(r["input_shape"] == info["input_shape"] for r in mine)
    assert dav2["cold_inference_sec"] == per_image[0]["cold_sec"]
    assert dav2["warm_samples"] == 4 and dav2["warm_p90_sec"] is None and dav2["warm_p99_sec"] is None
    md = next((tmp_path / "results").glob("*.md")).read_text(encoding="utf-8")
    section = md.split("## Per-Image Latency")[1].split("\n## ")[0]
    assert "bus.jpg" in section and "zidane.jpg" in section
    assert dav2["model_name"] in section and yolo["model_name"] not in section  # YOLO letterboxes: one shape


# -- noise --------------------------------------------------------------------------------



@pytest.fixture
def cpu_hogs():
    """Two real CPU-burning processes for the length of a test, always stopped after it."""
    hogs = [start_hog(cpu) for cpu in range(2)]
    time.sleep(1.0)
    yield hogs
    for hog in hogs:
        hog.kill()
        hog.wait()


def test_cpu_hog_beside_a_model_flags_it_noisy(tmp_path, one_image_dir, capsys, cpu_hogs):
    code, text = run_main(capsys, "--weights", "random", "--models", "yolo11n-detect", "--runs", "6",
                          "--no-dissect", "--images", one_image_dir, "--output-dir", tmp_path)
    assert code == 0, text
    row = load_report(tmp_path)["results"][0]
    assert row["noisy"] is True and row["other_cpu_cores"] > ub.NOISE_MAX_OTHER_CORES
    assert any("other processes used" in reason for reason in row["noise_reasons"])
    assert "[WARNING] YOLO11nDetectBenchmark figures are noisy" in text
    md = next((tmp_path / "results").glob("*.md")).read_text(encoding="utf-8")
    verdict = next(line for line in md.splitlines() if "| NOISY: " in line)  # the Noise table's row
    assert "(noisy)" in md and "other processes used" in verdict  # with the IQR reason too when the hogs spread it


# -- fixes from review --------------------------------------------------------------------


def test_reports_are_utf8_and_keep_non_ascii_image_names(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(BUS, images / "café bus.jpg")
    shutil.copy(ZIDANE, images / "zidane.jpg")
    code, text = run_main(capsys, "--weights", "random", "--models", "yolo11n-detect", "--runs", "1",
                          "--no-dissect", "--images", images, "--output-dir", tmp_path / "out")
    assert code == 0, text
    assert text.isascii()  # the console stays ASCII
    results = tmp_path / "out" / "results"
    assert "café bus.jpg" in next(results.glob("*.md")).read_text(encoding="utf-8")
    assert "café bus.jpg" in next(results.glob("*.json")).read_text(encoding="utf-8")
    csv_text = next(results.glob("*.csv")).read_text(encoding="utf-8")
    assert csv_text.startswith("model_name,") and "café bus.jpg; zidane.jpg" in csv_text
    assert [i["image"] for i in load_report(tmp_path / "out")["results"][0]["per_image"]] == ["café bus.jpg",
                                                                                             "zidane.jpg"]


AS_NOBODY = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch, unified_benchmark as ub
torch.cuda.is_available()
if os.getuid() == 0:
    os.setuid(65534)  # root reads every folder: list this one as user nobody
sys.exit(ub.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("locked", ["folder", "parent"])
def test_image_folder_that_cannot_be_listed_exits_2(tmp_path, locked):
    """Real permission errors, the program running as an ordinary user: the image folder itself is
    mode 000 (its parents opened for the test), or a folder above it is."""
    folder = tmp_path / "locked" / "images"
    folder.mkdir(parents=True)
    shutil.copy(BUS, folder / "bus.jpg")
    closed = folder if locked == "folder" else folder.parent
    opened = [(d, d.stat().st_mode) for d in folder.parents if d != Path("/")] if locked == "folder" else []
    for d, mode in opened:
        d.chmod(mode | 0o005)
    closed.chmod(0)
    try:
        proc = subprocess.run([sys.executable, "-c", AS_NOBODY, str(REPO), "--weights", "random", "--models",
                               "yolo11n-detect", "--images", str(folder), "--output-dir", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=120)
    finally:
        closed.chmod(0o755)
        for d, mode in opened:
            d.chmod(mode)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "cannot be listed" in text and str(folder) in text and "Traceback" not in text


def test_empty_models_option_is_a_usage_error(capsys):
    for value in ("", " , "):
        code, text = run_main(capsys, "--models", value)
        assert code == 2 and "--models is empty" in text


def test_markdown_cells_survive_pipes_and_newlines():
    lines = ub.table(["Model", "Reason"], [["M", "first line | with a pipe\nsecond line"]])
    assert len(lines) == 4  # header, rule, one row, blank
    assert lines[2] == "| M | first line \\| with a pipe<br>second line |"


def test_segment_masks_from_both_ultralytics_output_layouts(bus_image, cpu):
    """8.4 returns [(preds, proto), extras]; 8.3 returned (preds, (feats, mask coefficients, proto)).
    The 8.3 layout is rebuilt here from the real model's own tensors."""
    bench = ub.YOLO11nSegmentBenchmark(cpu, "random")
    bench.load()
    with torch.inference_mode():
        outputs = bench.forward(bench.preprocess(bus_image))
    preds, proto = ub.split_yolo_outputs(outputs)
    assert preds.shape[1] == 4 + 80 + 32 and proto.shape[1:] == (32, 160, 160)
    feats = [torch.zeros(1, 64, 80, 80)]
    layout_83 = (preds, (feats, preds[:, -32:], proto))
    assert all(a is b for a, b in zip(ub.split_yolo_outputs(layout_83), (preds, proto)))
    detect_83 = (preds[:, :84], [torch.zeros(1, 144, 80, 80), torch.zeros(1, 144, 40, 40), torch.zeros(1, 144, 20, 20)])
    assert ub.split_yolo_outputs(detect_83)[1] is None
    with torch.inference_mode():
        preds[:, 4, :5] = 0.9  # random weights detect nothing: plant five confident class-0 anchors
        results = [bench.postprocess(layout, bus_image) for layout in (outputs, layout_83)]
    for det, masks in results:
        assert len(det) > 0 and masks is not None and masks.shape == (len(det), 640, 640)


def test_model_timeout_covers_the_random_weights_build(tmp_path, one_image_dir, capsys, monkeypatch):
    monkeypatch.setenv(ub.CACHE_ENV, str(tmp_path / "empty-cache"))  # the builder must run
    code, text = run_main(capsys, "--weights", "random", "--models", "yolo11n-detect", "--runs", "1", "--no-dissect",
                          "--model-timeout", "0.5", "--images", one_image_dir, "--output-dir", tmp_path / "out")
    assert code == 1, text
    (row,) = load_report(tmp_path / "out")["results"]
    assert row["status"] == "timed_out" and row["failed_phase"] == "prepare random weights"
    assert "passed --model-timeout 0.5s" in row["error"]
    code, text = run_main(capsys, "--weights", "random", "--models", "yolo11n-detect", "--isolation", "none",
                          "--model-timeout", "60", "--images", one_image_dir, "--output-dir", tmp_path / "out")
    assert code == 2 and "--isolation none" in text
