"""Bad input, faults and interruptions: real files, real signals, real unwritable paths."""

import io
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import BUS, REPO, load_report, run_cli, run_main, skip_unless_ci, ub, write_yolo_checkpoint

FAST = ["--weights", "random", "--models", "yolo11n-detect", "--runs", "1"]


# -- images -------------------------------------------------------------------------


def write_bad_images(folder: Path) -> dict[str, str]:
    """Unusable files and the reason fragment the warning must give."""
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    data = BUS.read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    Image.new("1", (20000, 10000)).save(folder / "bomb.png")  # 200 Mpx, over twice Pillow's limit
    return {"zero.jpg": "empty file", "notes.jpg": "cannot identify", "cut.jpg": "truncated",
            "cut.png": "truncated", "bomb.png": "decompression-bomb"}


def write_odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Valid images in unusual formats and the upright (width, height) each must decode to."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.new("RGB", (64, 48), (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.new("RGBA", (64, 48), (10, 200, 30, 128)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (48, 64)).astype(np.uint16)).save(folder / "deep16.png")
    Image.new("CMYK", (64, 48), (0, 128, 255, 0)).save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees
    Image.new("RGB", (64, 48), (0, 0, 255)).save(folder / "rotated.JPEG", exif=exif)
    return {"gray.png": (64, 48), "palette.png": (64, 48), "rgba.png": (64, 48), "deep16.png": (64, 48),
            "cmyk.jpg": (64, 48), "rotated.JPEG": (48, 64)}


def test_odd_formats_decode_to_upright_rgb(tmp_path):
    for name, size in write_odd_images(tmp_path).items():
        image = ub.decode_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == size, name
    deep = np.asarray(ub.decode_image(tmp_path / "deep16.png"))
    assert 50 < deep.mean() < 200  # scaled from 16 bits, not clipped to white


def test_bad_images_are_skipped_with_reasons_and_the_rest_benchmarked(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    bad = write_bad_images(folder)
    good = write_odd_images(folder)
    code, text = run_main(capsys, *FAST, "--no-dissect", "--images", folder, "--output-dir", tmp_path / "out")
    assert code == 0, text
    for name, reason in bad.items():
        line = next(l for l in text.splitlines() if name in l and "Skipping invalid image" in l)
        assert reason in line, line
    report = load_report(tmp_path / "out")
    assert sorted(Path(p).name for p in report["images"]) == sorted(good)
    assert report["results"][0]["num_images"] == len(good)


@pytest.mark.parametrize("setup", ["missing", "empty", "only-bad"])
def test_no_usable_image_exits_2_naming_the_folder(tmp_path, capsys, setup):
    folder = tmp_path / "imgs"
    if setup != "missing":
        folder.mkdir()
    if setup == "only-bad":
        write_bad_images(folder)
    code, text = run_main(capsys, *FAST, "--images", folder, "--output-dir", tmp_path / "out")
    assert code == 2 and str(folder) in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


# -- weights ------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["text", "truncated"])
def test_broken_weight_file_exits_1_naming_it(tmp_path, one_image_dir, capsys, content):
    models = tmp_path / "models"
    models.mkdir()
    path = models / "yolo11n.pt"
    if content == "text":
        path.write_text("not a checkpoint")
    else:
        write_yolo_checkpoint(ub.YOLO11nDetectBenchmark, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    code, text = run_main(capsys, "--models", "yolo11n-detect", "--runs", "1", "--images", one_image_dir,
                          "--models-dir", models, "--output-dir", tmp_path / "out")
    assert code == 1
    assert str(path) in text and "delete it so it downloads again" in text
    assert "Traceback" not in text


def test_missing_weights_offline_are_all_listed_in_seconds(tmp_path, one_image_dir):
    """No HF_HUB_OFFLINE here: the download hosts are really probed (this machine has no network)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    start = time.monotonic()
    subprocess.run([sys.executable, str(REPO / "unified_benchmark.py"), "--help"], capture_output=True, env=env)
    startup_sec = time.monotonic() - start  # this machine's import time, however slow it is today
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "unified_benchmark.py"), "--images", str(one_image_dir),
                           "--models-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    # One probe timeout for all hosts at once; probing model by model would take 8 of them.
    limit_sec = ub.NETWORK_CHECK_TIMEOUT_SEC + 3 * startup_sec + 2
    assert elapsed < limit_sec, f"preflight took {elapsed:.1f}s (startup {startup_sec:.1f}s)"
    for needed in ("yolo11n.pt", "yolo11n-seg.pt", "yolo11n-pose.pt", "mobile_sam.pt", "apple/DepthPro-hf",
                   "Depth-Anything-V2-Small-hf", "Depth-Anything-V2-Base-hf", "Depth-Anything-V2-Large-hf"):
        assert needed in text
    assert "--weights random" in text and "Traceback" not in text
    assert not (tmp_path / "out" / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_exits_2_and_auto_falls_back(tmp_path, one_image_dir, capsys):
    code, text = run_main(capsys, *FAST, "--device", "cuda", "--images", one_image_dir, "--output-dir", tmp_path)
    assert code == 2 and "CUDA is not available" in text
    assert ub.resolve_device("auto").type == "cpu"
    assert "CUDA not available, falling back to CPU" in capsys.readouterr().out


# -- memory -------------------------------------------------------------------------


WORKER_VM = """
import re, sys
sys.path.insert(0, sys.argv[1])
import torch, transformers, unified_benchmark as ub
import ultralytics.nn.tasks
ub.runtime_init(torch.device("cpu"))
transformers.DepthProForDepthEstimation
print(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def worker_vm_size_bytes() -> int:
    """Address space of a fresh worker after its imports and runtime init (threads reserve stacks)."""
    proc = subprocess.run([sys.executable, "-c", WORKER_VM, str(REPO)], capture_output=True, text=True, timeout=120)
    return int(proc.stdout.strip()) * 1024


@pytest.mark.slow
def test_out_of_memory_is_named_and_keep_going_runs_the_next_model(tmp_path, one_image_dir):
    """A real MemoryError in the worker: full-size DepthPro (3.8 GB of weights) under an address-space
    limit that every worker inherits from the runner."""
    limit = worker_vm_size_bytes() + 2 * 1024**3  # room for a worker and YOLO, not for DepthPro

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = run_cli("--weights", "random", "--models", "depthpro,yolo11n-detect", "--runs", "1", "--no-dissect",
                   "--keep-going", "--images", one_image_dir, "--output-dir", tmp_path / "out",
                   env={ub.REDUCED_CONFIG_ENV: "0"}, preexec_fn=cap)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "DepthProBenchmark ran out of memory during load" in text and "process RSS" in text
    rows = load_report(tmp_path / "out")["results"]
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "ran out of memory" in rows[0]["error"] and rows[0]["failed_phase"] == "load"


def test_rss_growth_across_models_is_bounded(tmp_path, one_image_dir):
    """Three models in one fresh process (--isolation none): what cleanup keeps must be far less than a
    model takes. Bound: RSS after the third model's cleanup may exceed RSS after the first model's
    by at most half the memory one model used at its peak (measured in this run). A leak of the
    model and its activations would add about that much per model.
    """
    proc = run_cli("--weights", "random", "--models", "yolo11n-detect,yolo11n-seg,yolo11n-pose", "--runs", "2",
                   "--no-dissect", "--isolation", "none", "--images", one_image_dir, "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = load_report(tmp_path)["results"]
    one_model_mb = min(r["rss_peak_mb"] - r["rss_before_mb"] for r in rows)
    growth_mb = rows[2]["rss_after_cleanup_mb"] - rows[0]["rss_after_cleanup_mb"]
    assert one_model_mb > 20
    assert growth_mb < one_model_mb / 2, (growth_mb, one_model_mb)


@pytest.mark.slow  # the shared eight-model run
def test_each_worker_measures_memory_against_its_own_baseline(eight_models):
    """In worker processes the baseline is taken after imports and runtime init, so it is the
    same for every model and no model is charged for what an earlier one left behind."""
    code, text, report = eight_models
    assert code == 0, text
    rows = {r["class_name"]: r for r in report["results"]}
    sam, yolo = rows["MobileSAMBenchmark"], rows["YOLO11nDetectBenchmark"]
    ultralytics = [r for r in rows.values() if r["backend"].startswith("ultralytics")]
    assert max(r["mem_before_mb"] for r in ultralytics) - min(r["mem_before_mb"] for r in ultralytics) < 64
    assert len({r["worker_pid"] for r in rows.values()}) == 8
    assert yolo["mem_peak_mb"] < sam["mem_peak_mb"]  # MobileSAM's 1024x1024 activations stayed in its worker


# -- signals ------------------------------------------------------------------------


def start_run(tmp_path, *extra):
    return subprocess.Popen([sys.executable, str(REPO / "unified_benchmark.py"), "--weights", "random",
                             "--models", "yolo11n-detect,mobilesam", "--runs", "10", "--no-dissect",
                             "--output-dir", str(tmp_path / "out"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(proc, needle: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    pytest.fail(f"never saw {needle!r}:\n{''.join(lines)}")


@pytest.mark.parametrize("signum, code, keep_going", [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)])
def test_signal_stops_within_seconds(tmp_path, one_image_dir, signum, code, keep_going):
    proc = start_run(tmp_path, "--images", str(one_image_dir), *(["--keep-going"] if keep_going else []))
    lines = wait_for(proc, "[INFER 1/10] bus.jpg | Time", timeout=120)  # YOLO under way
    lines += wait_for(proc, "started for MobileSAMBenchmark", timeout=120)  # YOLO done
    lines += wait_for(proc, "[INFER 1/10]", timeout=120)  # MobileSAM under way, 9 runs to go
    worker = int(re.findall(r"Worker process (\d+) started for MobileSAMBenchmark", "".join(lines))[0])
    try:
        sent = time.monotonic()
        proc.send_signal(signum)
        while Path(f"/proc/{worker}").exists() and time.monotonic() - sent < 60:
            time.sleep(0.1)
        worker_sec = time.monotonic() - sent
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # The worker cleans up and exits on the signal, well inside the grace period after which it
    # would be SIGKILLed (its cleanup line proves it was not); the main process then reports.
    assert worker_sec < ub.WORKER_STOP_GRACE_SEC, (worker_sec, "".join(lines) + rest)
    assert proc.returncode == code, rest
    assert "Clearing model" in rest  # cleanup ran in the worker, which got the signal from the runner
    assert not Path(f"/proc/{worker}").exists()
    results = tmp_path / "out" / "results"
    # With or without --keep-going, the finished model is reported, marked incomplete.
    report = load_report(tmp_path / "out")
    assert report["complete"] is False and report["interrupted_by"] == signal.Signals(signum).name
    assert [r["class_name"] for r in report["results"]] == ["YOLO11nDetectBenchmark"]
    assert "INCOMPLETE RUN" in next(results.glob("*.md")).read_text()
    assert not list(results.glob(".*tmp")) and not list(results.glob("journal_*"))


# -- output folder ------------------------------------------------------------------


def test_output_below_a_regular_file_exits_1_with_the_path(tmp_path, one_image_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = run_main(capsys, *FAST, "--images", one_image_dir, "--output-dir", blocker / "out")
    assert code == 1 and str(blocker / "out") in text and "not writable" in text


@pytest.fixture
def tmpfs(tmp_path):
    """A small real filesystem, where the machine lets the test mount one."""
    mounts = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounts)}"
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                          capture_output=True).returncode != 0:
            skip_unless_ci("this machine does not allow mounting a tmpfs")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_disk_full_while_writing_reports_leaves_no_partial_file(tmp_path, one_image_dir, capsys, tmpfs):
    out = tmpfs("1m")
    (out / "results").mkdir()
    page = os.sysconf("SC_PAGE_SIZE")
    (out / "filler").write_bytes(b"\0" * (1024 * 1024 - page))  # one page left: the lock file takes it
    code, text = run_main(capsys, *FAST, "--no-dissect", "--images", one_image_dir, "--output-dir", out)
    assert code == 1, text
    assert "No space left on device" in text and str(out / "results") in text
    assert list((out / "results").iterdir()) == []


def test_dissection_stops_before_filling_the_disk_and_keeps_the_figures(tmp_path, one_image_dir, capsys, tmpfs):
    out = tmpfs("64m")  # under DISSECT_MIN_FREE_MB
    code, text = run_main(capsys, *FAST, "--images", one_image_dir, "--output-dir", out)
    assert code == 0, text
    assert "dissection stops" in text and "--no-dissect" in text and "figures are kept" in text
    row = load_report(out)["results"][0]
    assert row["status"] == "ok" and row["avg_inference_sec"] > 0 and row["mem_peak_mb"] > 0
    assert row["dissect_status"].startswith("stopped: ") and "--no-dissect" in row["dissect_status"]


def test_a_full_disk_faked_where_no_mount_is_allowed(tmp_path, one_image_dir, capsys, monkeypatch):
    """The two tests above on any machine, with the run in this process (--isolation none): the
    disk guard sees a patched shutil.disk_usage report 64 MB free, and the reports' fsync fails as
    a full disk fails a delayed write (ENOSPC)."""
    import errno
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ub.shutil, "disk_usage", lambda path: usage(1024**3, 1024**3 - 64 * 1024**2, 64 * 1024**2))
    code, text = run_main(capsys, *FAST, "--isolation", "none", "--images", one_image_dir, "--output-dir", tmp_path / "a")
    assert code == 0 and "dissection stops" in text and "figures are kept" in text, text
    assert load_report(tmp_path / "a")["results"][0]["dissect_status"].startswith("stopped: ")
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".benchmark_"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(ub.os, "fsync", fsync)
    out = tmp_path / "b"
    code, text = run_main(capsys, *FAST, "--no-dissect", "--isolation", "none", "--images", one_image_dir,
                          "--output-dir", out)
    assert code == 1 and "No space left on device" in text and str(out / "results") in text, text
    assert not list((out / "results").glob("*benchmark_*")), list((out / "results").iterdir())


# -- concurrency --------------------------------------------------------------------

HOLD_LOCK = ("import sys, time; sys.path.insert(0, sys.argv[1]); import unified_benchmark as ub; "
             "from pathlib import Path; ub.RunLock(Path(sys.argv[2])).acquire(); print('held', flush=True); "
             "time.sleep(60)")


def hold_lock(folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(REPO), str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_the_same_folder_exits_3_naming_the_holder(tmp_path, one_image_dir, capsys):
    holder = hold_lock(tmp_path)
    try:
        code, text = run_main(capsys, *FAST, "--images", one_image_dir, "--output-dir", tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert code == 3 and f"pid {holder.pid}" in text


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, one_image_dir, capsys):
    holder = hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, text = run_main(capsys, *FAST, "--no-dissect", "--images", one_image_dir, "--output-dir", tmp_path)
    assert code == 0, text
    assert "stale lock" in text and f"pid {holder.pid}" in text
