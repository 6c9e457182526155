"""Deployment options (--dtype, --channels-last, --compile, --fuse, --threads) run as a user runs
them and are recorded; FLOPs are counted exactly; MFU and energy say n/a where they cannot be had."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unified_benchmark as ub
from conftest import load_report, run_main

YOLO = ["--weights", "random", "--models", "yolo11n-detect", "--runs", "3", "--no-history"]


def csv_row(out: Path) -> dict:
    (path,) = (out / "results").glob("benchmark_summary_*.csv")
    with path.open(encoding="utf-8") as f:
        return next(csv.DictReader(f))


def markdown(out: Path) -> str:
    (path,) = (out / "results").glob("benchmark_report_*.md")
    return path.read_text(encoding="utf-8")


def test_bf16_channels_last_fuse_threads_on_yolo_recorded_everywhere(tmp_path, one_image_dir, capsys):
    """One real run with four options: the row, CSV, Markdown and history key carry them; the model
    runs fused (fewer parameters and leaves, counted as run); dissection captures bfloat16 outputs
    and gives each layer call its FLOPs."""
    code, out = run_main(capsys, *YOLO, "--images", one_image_dir, "--output-dir", tmp_path,
                         "--dtype", "bf16", "--channels-last", "--fuse", "--threads", "1")
    assert code == 0, out
    payload = load_report(tmp_path)
    row = payload["results"][0]
    assert payload["options"] == {"dtype": "bf16", "channels_last": True, "fuse": True, "threads": 1}
    assert (row["dtype"], row["channels_last"], row["fuse"], row["threads"], row["compile_mode"]) == \
        ("bf16", True, True, 1, None)
    assert row["cpu_affinity"] >= 1 and row["interop_threads"] >= 1
    unfused = ub.YOLO11nDetectBenchmark(torch.device("cpu"), "random")
    unfused.load()
    assert row["total_params"] < sum(p.numel() for p in unfused.model.parameters())
    assert row["leaf_modules"] < len(ub.leaf_modules(unfused.model))  # BatchNorms folded away
    assert row["gflops"] == pytest.approx(6.54, rel=0.01)  # fusion and bf16 leave the conv FLOPs as they are
    assert row["achieved_tflops"] == pytest.approx(row["gflops"] / 1e3 / row["warm_median_sec"])
    assert row["mfu"] is None and row["energy_j_per_inference"] is None  # CPU: n/a, never 0
    cells = csv_row(tmp_path)
    assert (cells["dtype"], cells["channels_last"], cells["fuse"], cells["threads"], cells["mfu"]) == \
        ("bf16", "True", "True", "1", "")
    md = markdown(tmp_path)
    assert "## Deployment and Compute" in md and "| YOLO11n-Detect | bf16 | True | eager | True | 1 |" in md
    assert "dtype=bf16, channels_last=True, compile=None, fuse=True, threads=1" in md
    meta = json.loads((Path(row["viz_dir"]) / "layers_metadata.json").read_text(encoding="utf-8"))
    convs = [l for l in meta["layers"] if l["type"] == "Conv2d"]
    assert convs and all(l["dtype"] == "bfloat16" and l["flops"] > 0 and l["files"] for l in convs)
    assert sum(l["flops"] for l in meta["layers"]) <= row["gflops"] * 1e9
    key = ub.model_config(payload, row)
    assert key["options"] == payload["options"]
    # bf16 with fusion and channels-last, against the unfused fp32 eager model: judged as reduced precision.
    assert row["parity"] in ("ok", "drift") and row["parity_thresholds"] == "reduced"
    assert row["parity_rel_l2_max"] > 1e-3 and row["parity_layers_compared"] == len(meta["layers"])
    fused = [l for l in meta["layers"] if (l.get("parity_note") or "").startswith("fused: against the unfused")]
    assert fused and all(l["type"] == "Conv2d" for l in fused)


@pytest.mark.slow
def test_bf16_on_a_transformers_model(tmp_path, one_image_dir, capsys):
    """DA-V2 Small (reduced configuration) under bf16 autocast: outputs reach the depth
    postprocessing as float32, attention is counted (CPU flash attention has a formula)."""
    code, out = run_main(capsys, "--weights", "random", "--models", "dav2-small", "--runs", "1", "--no-history",
                         "--images", one_image_dir, "--output-dir", tmp_path, "--dtype", "bf16")
    assert code == 0, out
    row = load_report(tmp_path)["results"][0]
    assert row["status"] == "ok" and row["dtype"] == "bf16"
    meta = json.loads((Path(row["viz_dir"]) / "layers_metadata.json").read_text(encoding="utf-8"))
    assert any(l["dtype"] == "bfloat16" and l["files"] for l in meta["layers"])
    # A variant with dissection compares its layers with the fp32 reference: every output has its error.
    assert row["parity"] in ("ok", "drift") and 0 < row["parity_agreement"] <= 1
    assert row["parity_task"]["abs_rel"] >= 0 and row["parity_layers_compared"] == len(meta["layers"])
    assert all(l["parity_rel_err"] is not None and l["parity_rel_err"] > 0 for l in meta["layers"]
               if l["dtype"] == "bfloat16")
    fp32 = ub.DepthAnythingV2SmallBenchmark(torch.device("cpu"), "random")
    fp32.load()
    image = ub.decode_image(one_image_dir / "bus.jpg")
    total, _, _, _ = fp32.count_flops(image)
    assert row["gflops"] * 1e9 == total  # identical across dtypes
    # What postprocessing receives under bf16 autocast: float32, as promised.
    bf16 = ub.DepthAnythingV2SmallBenchmark(torch.device("cpu"), "random", options=ub.RunOptions(dtype="bf16"))
    bf16.load()
    received = []
    postprocess = bf16.postprocess
    bf16.postprocess = lambda outputs, img: (received.append(ub.first_tensor(outputs)[0].dtype), postprocess(outputs, img))
    raw = bf16.run_forward(bf16.prepare(image))
    assert ub.first_tensor(raw)[0].dtype == torch.bfloat16  # the forward really ran in bf16 ...
    bf16.infer(image)
    assert received == [torch.float32]  # ... and its outputs reached postprocessing as float32


@pytest.mark.slow
def test_compile_on_the_cpu(tmp_path, one_image_dir, capsys):
    """torch.compile for YOLO11n: the first call is compile_sec, not a sample; the runs asked for
    are all there; recompilations are counted."""
    code, out = run_main(capsys, *YOLO, "--images", one_image_dir, "--output-dir", tmp_path, "--compile", "--no-dissect")
    assert code == 0, out
    row = load_report(tmp_path)["results"][0]
    assert row["compile_mode"] == "default" and row["compile_sec"] > 0
    # One image, one shape, no CUDA graphs on the CPU: one call compiles, YOLO's Detect head then
    # caches its anchors' shape and the second call recompiles; the third compiles nothing.
    assert row["compile_calls"] == 3
    assert len(row["inference_times_sec"]) == 3 and row["warm_samples"] == 2
    assert row["recompilations"] == 0  # one image, one shape: nothing compiled after the compile phase
    assert row["compile_sec"] > row["cold_inference_sec"]
    assert row["module_calls_before_cold_run"] == 0  # up to the compile phase
    # The accuracy check runs the very graphs that were timed: it prepares its inputs as infer() does
    # (an inference tensor would fail the guards, and the whole model would compile again).
    assert row["parity"] == "ok" and row["parity_recompilations"] == 0


def test_fp16_on_the_cpu_is_a_usage_error(tmp_path, one_image_dir, capsys):
    code, out = run_main(capsys, *YOLO, "--images", one_image_dir, "--output-dir", tmp_path, "--dtype", "fp16")
    assert code == ub.EXIT_USAGE
    assert "--dtype fp16 autocasts on CUDA only" in out and "bf16" in out
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("*.json"))


# -- FLOPs, exactly ----------------------------------------------------------------------------

def flops_of(module: torch.nn.Module, x: torch.Tensor) -> int:
    return ub.count_flops(lambda: module(x), ub.leaf_modules(module))[0]


def test_conv_flops_equal_a_hand_count():
    """2 x multiply-adds: out_h * out_w * out_channels * (in_channels / groups) * k * k per image."""
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 40, 30)
    assert flops_of(conv, x) == 2 * 2 * (20 * 15) * 32 * 16 * 3 * 3
    depthwise = torch.nn.Conv2d(24, 24, 5, padding=2, groups=24)
    y = torch.randn(1, 24, 17, 13)
    assert flops_of(depthwise, y) == 2 * (17 * 13) * 24 * 1 * 5 * 5


def test_cpu_flash_attention_is_counted():
    """Attention on the CPU runs a kernel torch's counter has no formula for; ours counts Q@K^T and
    attn@V: 2 x (2 x b x h x s x s x d)."""
    b, h, s, d = 2, 4, 64, 32
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))

    class Attention(torch.nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, k, v)

    assert flops_of(Attention(), q) == 2 * (2 * b * h * s * s * d)


def test_flops_are_the_same_in_every_dtype(bus_image, cpu, tmp_path, monkeypatch):
    monkeypatch.setenv(ub.CACHE_ENV, str(tmp_path))  # both counted here, neither read back
    counts = []
    for dtype in ("fp32", "bf16"):
        bench = ub.YOLO11nPoseBenchmark(cpu, "random", options=ub.RunOptions(dtype=dtype))
        bench.load()
        counts.append(bench.count_flops(bus_image))
    assert counts[0][0] == counts[1][0] > 0 and counts[0][1] == counts[1][1]
    assert counts[0][3] == counts[1][3] == "counted"


def test_a_flop_count_is_kept_for_the_same_architecture_and_shape_only(bus_image, cpu, tmp_path, monkeypatch):
    """The cache gives back exactly what a count gives; another input shape, another
    architecture (a parameter of another shape) or a changed record is counted afresh."""
    monkeypatch.setenv(ub.CACHE_ENV, str(tmp_path))
    bench = ub.YOLO11nDetectBenchmark(cpu, "random")
    bench.load()
    first, again = bench.count_flops(bus_image), bench.count_flops(bus_image)
    assert first[3] == "counted" and again == (*first[:3], "cache")
    assert first[0] > 0 and sum(first[1].values()) > 0  # the per-leaf-call counts come back too
    (record,) = tmp_path.glob("flops-YOLO11nDetectBenchmark-*.json")
    inputs = bench.prepare(bus_image)
    key = ub.flop_count_key("YOLO11nDetectBenchmark", bench.model, inputs, bench.options)
    assert record.name == f"flops-YOLO11nDetectBenchmark-{key[:20]}.json"
    assert ub.flop_count_key("YOLO11nDetectBenchmark", bench.model, inputs[..., :320], bench.options) != key
    assert ub.flop_count_key("YOLO11nDetectBenchmark", bench.model, inputs, ub.RunOptions(fuse=True)) != key
    other = ub.YOLO11nDetectBenchmark(cpu, "random")
    other.load()
    head = next(m for m in other.model.modules() if isinstance(m, torch.nn.Conv2d))
    head.weight = torch.nn.Parameter(head.weight[:, :-1].clone())  # one input channel fewer: another model
    head.in_channels -= 1
    assert ub.flop_count_key("YOLO11nDetectBenchmark", other.model, inputs, other.options) != key
    record.write_text("{not json", encoding="utf-8")
    assert bench.count_flops(bus_image) == first


def test_mfu_uses_the_peak_for_the_device_and_precision():
    assert ub.peak_tflops_for("NVIDIA H200", "bf16") == 989.4
    assert ub.peak_tflops_for("NVIDIA H100 PCIe", "bf16") == 756.0
    assert ub.peak_tflops_for("NVIDIA L40S", "fp32") == 91.6 and ub.peak_tflops_for("NVIDIA L4", "fp32") == 30.3
    assert ub.peak_tflops_for("NVIDIA GeForce GTX 1080", "fp32") is None and ub.peak_tflops_for(None, "fp32") is None
    figures = ub.compute_figures(int(6.5e9), {"conv": int(6.5e9), "matmul": 0}, 0.013, torch.device("cpu"), "fp32")
    assert figures["achieved_tflops"] == pytest.approx(0.5) and figures["mfu"] is None


def test_options_key_lists_what_differs_from_the_defaults():
    assert ub.RunOptions().key(2) == {}
    assert ub.RunOptions(dtype="bf16", threads=4).key(2) == {"dtype": "bf16", "threads": 4}


def test_fp16_reaching_a_cpu_worker_fails_its_row_saying_why(tmp_path, one_image_dir):
    """On Ray each node resolves its own device: a CPU node given --dtype fp16 fails that model's
    row with the fix, instead of the whole run."""
    job = ub.WorkerJob(class_name="YOLO11nDetectBenchmark", device="cpu", weights="random", models_dir=str(tmp_path),
                       images=[str(one_image_dir / "bus.jpg")], runs=1, dissect=False, dissect_mode="single-pass",
                       viz_dir=str(tmp_path / "viz"), options={"dtype": "fp16"})
    row = ub.run_model(job, ub.ModelProgress())
    assert row["status"] == "failed" and "--dtype fp16 autocasts on CUDA only" in row["error"], row


def test_threads_equal_to_the_usable_cpus_are_the_default_in_the_history_key(monkeypatch):
    """--threads 2 on a 2-CPU box runs as the default does: the same configuration key; the count
    is the one the run began with, so a recovery on a process pinned to fewer CPUs keeps its key."""
    assert ub.RunOptions(threads=2).key(2) == ub.RunOptions().key(2) == {}
    assert ub.RunOptions(threads=1).key(2) == {"threads": 1}
    assert ub.RunOptions(threads=2, dtype="bf16", channels_last=True).key(2) == {"dtype": "bf16", "channels_last": True}
    assert ub.RunOptions(threads=2).key(1) == {"threads": 2}
    monkeypatch.setattr(ub, "usable_cpus", lambda: 2)
    cfg = ub.RunConfig(models=[ub.YOLO11nDetectBenchmark], images=[], image_source="test", runs=1,
                       device=torch.device("cpu"), weights="random", models_dir=Path("m"), output_dir=Path("o"),
                       dissect=False, dissect_mode="single-pass", keep_going=False, options=ub.RunOptions(threads=2))
    monkeypatch.setattr(ub, "usable_cpus", lambda: 1)  # the recovering process: pinned to one CPU
    recovered = ub.RunConfig.from_record(json.loads(json.dumps(cfg.record())))
    assert recovered.usable_cpus == 2 and recovered.options.key(recovered.usable_cpus) == {}