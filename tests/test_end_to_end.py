"""main() end to end with random weights: the three reports, their fields and values."""

import csv
import json
import math
from datetime import datetime, timedelta

import numpy as np
import pytest
from conftest import run_main, ub


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Two real runs in a row (the second in the same second, usually): detect+pose, then detect."""
    import shutil

    from conftest import BUS, ZIDANE

    root = tmp_path_factory.mktemp("e2e")
    images = root / "images"
    images.mkdir()
    shutil.copy(BUS, images / "bus.jpg")
    shutil.copy(ZIDANE, images / "zidane.JPG")  # upper-case suffix counts too
    out = root / "out"
    first = ub.main(["--weights", "random", "--models", "yolo11n-detect,yolo11n-pose", "--runs", "3",
                     "--images", str(images), "--output-dir", str(out)])
    second = ub.main(["--weights", "random", "--models", "yolo11n-detect", "--runs", "1", "--no-dissect",
                      "--images", str(images), "--output-dir", str(out)])
    return first, second, out


def reports(out):
    return sorted((out / "results").glob("benchmark_*"))


def test_both_runs_succeed_and_keep_their_own_reports(e2e):
    first, second, out = e2e
    assert (first, second) == (0, 0)
    names = [p.name for p in reports(out)]
    stamps = sorted({n.rsplit("_", 2)[-2] + "_" + n.rsplit("_", 2)[-1].split(".")[0] for n in names})
    assert len(stamps) == 2, names
    for stamp in stamps:
        for kind in ("results_{}.json", "summary_{}.csv", "report_{}.md"):
            assert f"benchmark_{kind.format(stamp)}" in names


def first_json(out):
    path = sorted((out / "results").glob("benchmark_results_*.json"))[0]
    return json.loads(path.read_text())


def test_json_holds_every_figure_with_sane_values(e2e):
    _, _, out = e2e
    data = first_json(out)
    assert data["weights"] == "random" and data["complete"] is True and data["random_seed"] == 42
    assert [p.split("/")[-1] for p in data["images"]] == ["bus.jpg", "zidane.JPG"]
    env = data["environment"]
    for key in ("os", "python", "torch", "cuda_version", "cudnn_version", "gpu_name", "cpu_model",
                "torch_threads", "transformers", "ultralytics"):
        assert key in env
    detect, pose = data["results"]
    assert detect["class_name"] == "YOLO11nDetectBenchmark" and pose["class_name"] == "YOLO11nPoseBenchmark"
    for row in (detect, pose):
        times = row["inference_times_sec"]
        assert len(times) == 2 * 3 == len(row["runs"])
        assert row["min_inference_sec"] <= row["avg_inference_sec"] <= row["max_inference_sec"]
        assert math.isclose(row["fps_avg"], 1 / row["avg_inference_sec"])
        assert row["cold_inference_sec"] == times[0]
        assert row["warm_samples"] == 2 * 2  # runs 2 and 3 of each image
        warm = [r["inference_sec"] for r in row["runs"] if r["run"] > 1]
        assert row["warm_median_sec"] == pytest.approx(float(np.median(warm)))
        assert row["warm_p90_sec"] is None and row["warm_p99_sec"] is None  # 4 samples support neither
        assert row["fps_std"] == pytest.approx(float(np.std([1 / t for t in times])))
        assert row["module_calls_before_cold_run"] == 0 and row["isolation"] == "process"
        assert row["preprocess_avg_sec"] > 0 and row["postprocess_avg_sec"] > 0
        assert row["load_time_sec"] > 0
        assert row["mem_kind"] == "process_rss"
        assert 0 < row["mem_before_mb"] <= row["mem_peak_mb"]
        assert row["rss_after_cleanup_mb"] > 0 and row["mem_not_returned_mb"] is not None
        assert row["input_shape"] == [1, 3, 640, 640] and row["input_size"] == 640
        assert row["weights_source"] == "random (seeded)" and row["backend"].startswith("ultralytics ")
        assert row["dissect_mode"] == "single-pass" and row["dissect_bytes_written"] > 0
        assert row["dissect_time_sec"] > 0
    assert detect["total_params"] == 2_624_080 and detect["leaf_modules"] == 181
    assert detect["total_layers_dissected"] == 259


def test_csv_starts_with_the_spec_columns(e2e):
    _, _, out = e2e
    path = sorted((out / "results").glob("benchmark_summary_*.csv"))[0]
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0])[: len(ub.SPEC_CSV_COLUMNS)] == ub.SPEC_CSV_COLUMNS
    assert [r["model_name"] for r in rows] == ["YOLO11n-Detect", "YOLO11n-Pose"]
    assert int(rows[0]["total_params"]) == 2_624_080 and float(rows[0]["avg_inference_sec"]) > 0


def test_markdown_has_the_spec_sections_and_links_the_overviews(e2e):
    _, _, out = e2e
    path = sorted((out / "results").glob("benchmark_report_*.md"))[0]
    text = path.read_text()
    for section in ("## System Information", "## Benchmark Configuration", "## Results", "## Analysis",
                    "## Visualizations", "## Latency Detail", "## Memory", "## Weights and Preprocessing"):
        assert section in text
    assert "Weights: **random**" in text and "bus.jpg, zidane.JPG" in text
    assert "LetterBox" in text  # the preprocessing note
    stamp = path.stem.rsplit("_", 2)[-2] + "_" + path.stem.rsplit("_", 2)[-1]
    link = f"../viz/{stamp}/YOLO11nDetectBenchmark/overview.png"
    assert link in text and (path.parent / link).resolve().is_file()
    assert "## Phases (s)" in text and "## Noise" in text and "Isolation: **process**" in text


def test_no_dissect_writes_no_viz_folder(e2e):
    _, _, out = e2e
    data = json.loads(sorted((out / "results").glob("benchmark_results_*.json"))[1].read_text())
    assert data["results"][0]["total_layers_dissected"] == 0
    assert not (out / "viz" / data["timestamp"]).exists()
    assert [p.name for p in (out / "viz").iterdir()] == [first_json(out)["timestamp"]]


def test_list_shows_every_model(capsys):
    code, text = run_main(capsys, "--list", "--weights", "random")
    assert code == 0
    lines = {line.split()[0]: line for line in text.splitlines() if line.split()}
    for cls in ub.MODEL_REGISTRY:  # random weights need no file: every model is available
        line = lines[cls.SHORT_NAME]
        assert cls.__name__ in line and line.rstrip().endswith(" yes"), line


def test_a_timestamp_in_use_is_never_reused(tmp_path):
    """Reports or a viz folder of this second and the next two: the run takes a later second."""
    now = datetime.now()
    stamps = [(now + timedelta(seconds=i)).strftime(ub.TIMESTAMP_FORMAT) for i in range(3)]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"benchmark_results_{stamps[0]}.json").write_text("{}")
    (tmp_path / "results" / f"journal_{stamps[1]}.jsonl").write_text("")
    (tmp_path / "viz" / stamps[2]).mkdir(parents=True)
    assert ub.claim_timestamp(tmp_path) > stamps[2]


@pytest.mark.parametrize("args, needle", [
    (["--models", "yolo12x"], "Valid models: depthpro, dav2-small"),
    (["--runs", "0"], "positive"),
    (["--runs", "-3"], "positive"),
    (["--runs", "abc"], "whole number"),
    (["--device", "gpu"], "Valid: auto, cpu, cuda, cuda:N"),
    (["--weights", "imagenet"], "choose from"),
    (["--bogus"], "unrecognized arguments"),
    (["--executor", "ray", "--isolation", "none"], "--isolation none runs the models in this process"),
    (["--compare", "a.json"], "expected 2 arguments"),
    (["--compare", "a.json", "b.json", "--merge", "c.json"], "not allowed with argument"),
])
def test_usage_errors_exit_2_with_the_valid_choices(capsys, args, needle):
    code, text = run_main(capsys, *args)
    assert code == 2
    assert needle in text and "Traceback" not in text
