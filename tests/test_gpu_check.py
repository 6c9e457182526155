"""The GPU check's pure logic (tests/gpu/check_cuda.py), on hand-made rows: no GPU, no model run."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

import check_cuda as cc  # noqa: E402

H200 = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}


def ok_row(**changes) -> dict:
    """A plausible fp32 YOLO11n-Detect row on an H200 that passes every check."""
    row = {"status": "ok", "error": None, "device": "cuda:0", "model_name": "YOLO11n-Detect",
           "class_name": "YOLO11nDetectBenchmark", "dtype": "fp32", "warm_median_sec": 0.020,
           "warm_median_event_sec": 0.0199, "mem_not_returned_mb": 2.0, "mem_peak_mb": 120.0, "gflops": 6.5,
           "achieved_tflops": 0.33, "flops_by_class": {"conv": 6_400_000_000, "matmul": 100_000_000},
           "tf32": {"conv": True, "matmul": False}, "peak_tflops": 440.0, "peak_precision": "conv tf32, matmul fp32",
           "mfu": 0.00075, "energy_j_per_inference": 1.5, "power_mean_w": 150.0, "power_idle_w": 75.0,
           "power_limit_w": 700.0, "nvml": "ok", "compile_sec": None, "compile_calls": None}
    return {**row, **changes}


def levels(findings) -> list[str]:
    return [f.level for f in findings]


def fails(findings) -> list[str]:
    return [f.text for f in findings if f.level == "FAIL"]


@pytest.mark.parametrize("idle_w, mean_w, limit_w, expected", [
    (70.2, 70.0, 700.0, True),    # a tiny model barely above (here below) idle: the old idle < mean rule failed it
    (70.0, 66.0, 700.0, True),    # within 5 W below idle
    (200.0, 191.0, 700.0, True),  # 5% of idle (10 W) is the larger tolerance
    (70.0, 40.0, 700.0, False),   # far below idle: the counter or the windows are wrong
    (70.0, 750.0, 700.0, False),  # above the power limit (+5%)
    (0.0, 50.0, 700.0, False),    # no idle draw at all
])
def test_energy_plausible_tolerates_idle_noise(idle_w, mean_w, limit_w, expected):
    ok, reason = cc.energy_plausible(idle_w, mean_w, limit_w)
    assert ok is expected, reason
    assert not reason.startswith("skipped")


@pytest.mark.parametrize("idle_w, mean_w, limit_w", [(None, 100.0, 700.0), (70.0, None, 700.0), (70.0, 100.0, None)])
def test_energy_plausible_none_is_skipped_not_failed(idle_w, mean_w, limit_w):
    ok, reason = cc.energy_plausible(idle_w, mean_w, limit_w)
    assert ok and reason.startswith("skipped")


def test_plausible_row_passes_every_check():
    assert cc.check_row(ok_row(), H200) == []


def test_events_8_percent_off_at_20_ms_fails_at_5_ms_not_judged():
    assert any("CUDA events" in t for t in fails(cc.check_row(ok_row(warm_median_event_sec=0.0216), H200)))
    assert cc.check_row(ok_row(warm_median_sec=0.005, warm_median_event_sec=0.0054, achieved_tflops=1.3,
                               mfu=0.003), H200) == []


def test_events_missing_over_10_ms_fails():
    assert fails(cc.check_row(ok_row(warm_median_event_sec=None), H200))


def test_nvml_na_is_skipped_not_failed():
    row = ok_row(nvml="n/a: NVMLError_LibraryNotFound", energy_j_per_inference=None, power_mean_w=None,
                 power_idle_w=None, power_limit_w=None)
    assert levels(cc.check_row(row, H200)) == ["SKIPPED"]


def test_nvidia_ml_py_missing_is_skipped():
    row = ok_row(nvml=None, energy_j_per_inference=None, power_mean_w=None, power_idle_w=None, power_limit_w=None)
    assert levels(cc.check_row(row, H200, pynvml_installed=False)) == ["SKIPPED"]
    assert levels(cc.check_row(row, H200, pynvml_installed=True)) == ["FAIL"]  # the field itself is missing


def test_implausible_energy_with_nvml_fails():
    assert any("energy" in t for t in fails(cc.check_row(ok_row(power_mean_w=40.0), H200)))


@pytest.mark.parametrize("mfu", [1.3, 0.0, None])
def test_mfu_outside_0_1_fails(mfu):
    assert any("MFU" in t for t in fails(cc.check_row(ok_row(mfu=mfu), H200)))


def test_unknown_gpu_skips_mfu():
    unknown = {p: None for p in cc.PRECISIONS}
    assert levels(cc.check_row(ok_row(mfu=None, peak_tflops=None), unknown)) == ["FAIL", "SKIPPED"]  # peak_tflops None
    assert levels(cc.check_row(ok_row(mfu=None), unknown)) == ["SKIPPED"]


def test_missing_fields_fail_without_key_error():
    found = cc.check_row({"status": "ok"}, H200)
    texts = " ".join(fails(found))
    for name in ("device", "warm_median_sec", "mem_not_returned_mb", "flops_by_class", "tf32", "peak_tflops", "nvml"):
        assert name in texts


def test_failed_row_is_one_fail():
    assert fails(cc.check_row({"status": "timed_out", "error": "past 90 s"}, H200)) == ["status 'timed_out': past 90 s"]


def test_memory_not_returned_and_wrong_device_fail():
    assert fails(cc.check_row(ok_row(mem_not_returned_mb=300.0), H200))
    assert fails(cc.check_row(ok_row(device="cuda"), H200))


def test_tf32_bound_on_conv_heavy_fp32_rows():
    over = ok_row(achieved_tflops=400.0, mfu=0.9)  # 6x plain fp32: the FLOPs or the timings are wrong
    assert any("plain fp32 peak" in t for t in fails(cc.check_row(over, H200)))
    assert cc.check_row({**over, "class_name": "DepthProBenchmark"}, H200) == []  # not a conv-heavy model
    assert cc.check_row({**over, "dtype": "bf16", "peak_tflops": 989.4}, H200) == []  # fp32 only


def test_tf32_conv_needs_a_peak_above_plain_fp32():
    row = ok_row(peak_tflops=66.9, mfu=0.005)
    assert any("TF32 convolutions" in t for t in fails(cc.check_row(row, H200)))
    assert cc.check_row({**row, "tf32": {"conv": False, "matmul": False}}, H200) == []


def test_mix_peak_outside_its_classes_fails():
    assert any("outside" in t for t in fails(cc.check_row(ok_row(peak_tflops=600.0), H200)))
    bf16 = ok_row(dtype="bf16", peak_tflops=989.4, mfu=0.0003)
    assert cc.check_row(bf16, H200) == []


def test_dissection_findings():
    meta = {"layers": [{"forward_ms": 0.05, "files": ["layer_001_conv.png", "layer_001_conv.npy"]},
                       {"forward_ms": 0.02, "files": []}]}
    row = {"dissect_status": "complete", "dissect_files": 3, "layer_timing": "separate pass"}
    assert cc.dissection_findings(row, meta, lambda f: True) == []
    assert fails(cc.dissection_findings(row, meta, lambda f: False))  # a listed PNG is not there
    assert fails(cc.dissection_findings({**row, "layer_timing": "capture pass"}, meta, lambda f: True))
    assert fails(cc.dissection_findings({**row, "dissect_status": "stopped: disk"}, meta, lambda f: True))
    untimed = {"layers": [{**meta["layers"][0], "forward_ms": None}, meta["layers"][1]]}
    assert fails(cc.dissection_findings(row, untimed, lambda f: True))
    assert fails(cc.dissection_findings(row, None, lambda f: True))


def test_compile_findings():
    assert cc.compile_findings({"compile_calls": 2, "compile_sec": 70.0}) == []
    assert len(cc.compile_findings({"compile_calls": 1, "compile_sec": None})) == 2


def test_planted_findings():
    assert cc.planted_findings(150.0, 1180.0) == []
    assert fails(cc.planted_findings(150.0, 400.0))
    assert fails(cc.planted_findings(None, None))


def test_budget_helpers():
    assert cc.part_timeout_sec(150, 400) == 150
    assert cc.part_timeout_sec(150, 60) == 60
    assert cc.part_timeout_sec(150, 5) is None
    assert cc.model_timeout_sec(240, 150) == 140
    assert cc.model_timeout_sec(60, 150) == 60


def test_table_rows_render_with_missing_figures():
    found = cc.check_row({"status": "ok"}, H200)
    text = cc.render_table([cc.table_row("fp32", ok_row(), []), cc.table_row("fp32", {"status": "ok"}, found),
                            cc.placeholder_row("DepthProBenchmark", "fp32", "missing")])
    assert text.count("\n") == 4 and "n/a" in text and "missing" in text


def test_parts_fit_the_budget_and_parse(tmp_path):
    parts = cc.plan_parts(cc.DEFAULT_BF16_MODELS)
    assert [p.name for p in parts] == ["dissect", "fp16-compile", "fp32", "onnxruntime", "planted", "bf16"]
    for part in parts:
        if part.name != "planted":
            args = cc.ub.build_parser().parse_args(cc.program_command(part, tmp_path, part.budget_sec)[2:])
            in_process = args.isolation == "none"  # no worker to stop: the part's budget bounds it
            assert (args.model_timeout is None) if in_process else args.model_timeout < part.budget_sec
            assert args.keep_going and args.weights == "random"
    assert cc.TOTAL_BUDGET_SEC < 450 - 15  # room for the wheel install and interpreter start


def ort_row(**changes) -> dict:
    """A plausible onnxruntime row on CUDA beside its torch row."""
    row = {"status": "ok", "device": "cuda:0", "runtime": "onnxruntime", "runtime_device": "CUDA:0", "parity": "ok",
           "mem_kind": "gpu_process_nvml", "warm_median_event_sec": None, "runtime_cpu_nodes": 12,
           "runtime_settings": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "io_binding": "cuda:0"},
           "runtime_nodes_by_provider": {"CUDAExecutionProvider": 300, "CPUExecutionProvider": 12},
           "speedup_vs_baseline": 1.4, "mem_peak_mb": 900.0, "mem_note": None, "nvml": "ok"}
    return {**row, **changes}


def test_an_onnxruntime_row_on_cuda_is_judged_by_its_own_checks():
    assert cc.runtime_row_findings(ort_row()) == []
    fallen_back = cc.runtime_row_findings(ort_row(runtime_device="CPU", runtime_settings={"providers": ["CPUExecutionProvider"]}))
    assert len(fails(fallen_back)) == 3 and any("lack CUDA's" in t for t in fails(fallen_back))
    # CUDA's provider listed, every node on the CPU: a CPU row in disguise.
    all_on_cpu = ort_row(runtime_nodes_by_provider={"CPUExecutionProvider": 312}, runtime_cpu_nodes=312)
    assert any("no node on CUDAExecutionProvider" in t for t in fails(cc.runtime_row_findings(all_on_cpu)))
    assert any("runtime_cpu_nodes" in t for t in fails(cc.runtime_row_findings(ort_row(runtime_cpu_nodes=None))))
    assert any("parity" in t for t in fails(cc.runtime_row_findings(ort_row(parity="failed"))))
    assert levels(cc.runtime_row_findings(ort_row(mem_peak_mb=None, mem_note="no GPU memory figure: ..."))) == ["SKIPPED"]
    assert levels(cc.runtime_row_findings(ort_row(mem_peak_mb=None))) == ["FAIL"]  # no figure, no reason


def test_the_onnxruntime_part_is_skipped_without_onnxruntime_gpu():
    import onnxruntime

    assert "not onnxruntime-gpu" in cc.onnxruntime_skip(onnxruntime.get_available_providers())  # the CPU wheel here
    assert "not installed" in cc.onnxruntime_skip(None)
    assert cc.onnxruntime_skip(["CUDAExecutionProvider", "CPUExecutionProvider"]) is None


def test_every_part_is_a_command_line_the_program_accepts(tmp_path, monkeypatch, capsys):
    """Each part's options, through the program's parser and its usage checks (which run before
    any model: a clash such as --model-timeout with --isolation none is exit 2 right away)."""
    import unified_benchmark as ub

    monkeypatch.setattr(cc, "asset_images", lambda: tmp_path / "no-images")
    for part in cc.plan_parts("all"):
        if part.name == "planted":
            continue
        argv = cc.program_command(part, tmp_path / "out", 100)[2:]
        code = ub.main(argv)
        text = capsys.readouterr().out
        # The only complaints allowed here: no CUDA on this machine, or the missing image folder
        # (both checked after the options and their combinations).
        assert code == ub.EXIT_USAGE and ("CUDA is not available" in text or "no-images" in text), (part.name, text)
