"""The eight real architectures: full-size parameter counts, random-weight inference on a
real photo, and the pretrained loading paths against checkpoints written here."""


import pytest
import torch
from conftest import load_report, run_cli, ub, write_yolo_checkpoint

# Parameters of the real architectures, counted from the libraries' own builders.
FULL_SIZE_PARAMS = {
    "DepthProBenchmark": 951_994_402,               # 952.0M
    "DepthAnythingV2SmallBenchmark": 24_785_089,    # 24.8M
    "DepthAnythingV2BaseBenchmark": 97_470_785,     # 97.5M
    "DepthAnythingV2LargeBenchmark": 335_315_649,   # 335.3M
    "YOLO11nDetectBenchmark": 2_624_080,            # 2.62M
    "YOLO11nSegmentBenchmark": 2_876_848,           # 2.88M
    "YOLO11nPoseBenchmark": 2_874_462,              # 2.87M: nc=1 as in yolo11n-pose.pt (README)
    "MobileSAMBenchmark": 10_130_092,               # 10.13M
}
BY_NAME = {cls.__name__: cls for cls in ub.MODEL_REGISTRY}


def full_size_model(cls, monkeypatch):
    """Build the full-size random architecture; transformers models on the meta device."""
    monkeypatch.delenv(ub.REDUCED_CONFIG_ENV, raising=False)
    bench = cls(torch.device("cpu"), "random")
    if isinstance(bench, ub.HFDepthBenchmark):
        import transformers

        with torch.device("meta"):
            return getattr(transformers, cls.MODEL_CLASS)(bench._config())
    return bench._build_random()


@pytest.mark.parametrize("name", FULL_SIZE_PARAMS)
def test_full_size_parameter_counts(name, monkeypatch):
    model = full_size_model(BY_NAME[name], monkeypatch)
    assert sum(p.numel() for p in model.parameters()) == FULL_SIZE_PARAMS[name]


def test_depthpro_full_size_has_953_leaf_modules_besides_dropout(monkeypatch):
    """The architecture's 953 leaves on every supported transformers; the Dropout modules beside
    them (inactive at inference) depend on the version: 3 in transformers 5, 75 in 4.53."""
    model = full_size_model(ub.DepthProBenchmark, monkeypatch)
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    assert sum(1 for m in leaves if not isinstance(m, torch.nn.Dropout)) == 953


def test_registry_holds_the_eight_models_in_the_spec_order():
    assert [c.SHORT_NAME for c in ub.MODEL_REGISTRY] == [
        "depthpro", "dav2-small", "dav2-base", "dav2-large",
        "yolo11n-detect", "yolo11n-seg", "yolo11n-pose", "mobilesam"]
    assert ub.resolve_models("DepthProBenchmark,YOLO11N-DETECT") == [ub.DepthProBenchmark, ub.YOLO11nDetectBenchmark]


def check_task_output(bench, result, image):
    """Each postprocess returns a real task result at the image's size."""
    if isinstance(bench, ub.HFDepthBenchmark):
        depth = result[0]["predicted_depth"]
        assert tuple(depth.shape) == (image.height, image.width)
        assert torch.isfinite(depth).all()
    elif isinstance(bench, ub.YOLO11Benchmark):
        det, masks = result
        assert det.ndim == 2 and det.shape[1] >= 6
        if isinstance(bench, ub.YOLO11nPoseBenchmark):
            assert det.shape[1] == 6 + 17 * 3
    else:
        assert result.shape == (1, 1, image.height, image.width) and result.dtype == torch.bool


@pytest.mark.parametrize("name", FULL_SIZE_PARAMS)
def test_random_weights_load_and_infer_on_a_real_photo(name, bus_image, cpu):
    bench = BY_NAME[name](cpu, "random")
    bench.load()
    timing = bench.infer(bus_image)
    assert timing["inference_sec"] > 0 and timing["preprocess_sec"] > 0 and timing["postprocess_sec"] > 0
    with torch.inference_mode():
        result = bench.postprocess(bench.forward(bench.preprocess(bus_image)), bus_image)
    check_task_output(bench, result, bus_image)
    info = bench.get_info()
    weights_mb = sum(p.numel() * p.element_size() for p in bench.model.parameters()) / 2**20
    assert timing["peak_rss_mb"] > weights_mb  # the peak is the process's, the loaded weights in it
    assert info["input_shape"][0] == 1 and info["input_shape"][1] == 3
    sides = info["input_shape"][-2:]
    if bench.SHORT_NAME.startswith("dav2"):  # aspect kept: the shorter side is the input size, multiples of 14
        assert min(sides) == bench.INPUT_SIZE and all(s % 14 == 0 for s in sides), sides
    elif bench.SHORT_NAME != "depthpro" or not bench.reduced:
        assert max(sides) == bench.INPUT_SIZE, sides
    if not bench.reduced:
        assert info["total_params"] == FULL_SIZE_PARAMS[name]
    bench.cleanup()
    assert bench.model is None


# -- the pretrained loading paths, offline, against checkpoints written here ----------------


@pytest.mark.parametrize("cls", [ub.YOLO11nDetectBenchmark, ub.YOLO11nSegmentBenchmark, ub.YOLO11nPoseBenchmark])
def test_yolo_pretrained_path_loads_a_local_checkpoint(cls, tmp_path, bus_image, cpu):
    params = write_yolo_checkpoint(cls, tmp_path / cls.MODEL_PATH)
    bench = cls(cpu, "pretrained", tmp_path)
    assert all(r.present for r in bench.requirements())
    bench.load()
    assert bench.weight_source == str(tmp_path / cls.MODEL_PATH)
    assert sum(p.numel() for p in bench.model.parameters()) == params
    assert bench.infer(bus_image)["inference_sec"] > 0


def test_mobilesam_pretrained_path_loads_a_state_dict(tmp_path, bus_image, cpu):
    from ultralytics.models.sam.build import build_mobile_sam

    torch.manual_seed(7)
    reference = build_mobile_sam()
    torch.save(reference.state_dict(), tmp_path / "mobile_sam.pt")
    bench = ub.MobileSAMBenchmark(cpu, "pretrained", tmp_path)
    bench.load()
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(bench.model.state_dict()[key], reference.state_dict()[key])
    assert bench.infer(bus_image)["inference_sec"] > 0


def write_hub_snapshot(cache, cls, monkeypatch, dtype=torch.float32):
    """Save a reduced model (in dtype) with save_pretrained where the HF cache keeps hub id cls.MODEL_ID.

    Reduced DA-V2 Base/Large have the Small variant's widths: under their hub ids they are
    checkpoints with the wrong features/out_channels.
    """
    monkeypatch.setenv(ub.REDUCED_CONFIG_ENV, "1")
    bench = cls(torch.device("cpu"), "random")
    bench.load()
    repo = cache / ("models--" + cls.MODEL_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef"
    bench.model.to(dtype).save_pretrained(snapshot)
    bench.processor.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return sum(p.numel() for p in bench.model.parameters())


@pytest.mark.slow
def test_transformers_pretrained_path_loads_from_the_hf_cache(tmp_path, one_image_dir, monkeypatch):
    """DepthPro and DA-V2 through from_pretrained, as a user's run does, from a cache written here."""
    cache = tmp_path / "hf-cache"
    params = {cls.__name__: write_hub_snapshot(cache, cls, monkeypatch)
              for cls in (ub.DepthProBenchmark, ub.DepthAnythingV2SmallBenchmark)}
    out = tmp_path / "out"
    proc = run_cli("--models", "depthpro,dav2-small", "--runs", "1", "--no-dissect", "--images", one_image_dir,
                   "--output-dir", out, env={"HF_HUB_CACHE": str(cache), ub.REDUCED_CONFIG_ENV: "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["class_name"]: r for r in load_report(out)["results"]}
    for name, count in params.items():
        assert rows[name]["status"] == "ok"
        assert rows[name]["weights_source"].startswith("huggingface:")
        assert rows[name]["total_params"] == count
        assert rows[name]["module_calls_before_cold_run"] == 0 and rows[name]["downloaded"] is False
    assert rows["DepthProBenchmark"]["input_shape"] == [1, 3, 768, 768]  # the saved processor's size


def test_a_half_precision_hub_checkpoint_runs_and_is_labelled_fp32(tmp_path, one_image_dir, monkeypatch):
    """transformers 5 would load a checkpoint stored in float16 as float16 (its default dtype is
    'auto') and the row would still say fp32: the tool asks for float32 and records what is stored."""
    cache = tmp_path / "hf-cache"
    write_hub_snapshot(cache, ub.DepthAnythingV2SmallBenchmark, monkeypatch, dtype=torch.float16)
    out = tmp_path / "out"
    proc = run_cli("--models", "dav2-small", "--runs", "1", "--no-dissect", "--no-history", "--images", one_image_dir,
                   "--output-dir", out, env={"HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = load_report(out)["results"][0]
    assert row["status"] == "ok" and row["dtype"] == "fp32"
    assert row["checkpoint_dtype"] == "fp16" and row["weights_dtype"] == "fp32", row


def test_dav2_with_wrong_features_fails_clearly(tmp_path, one_image_dir, monkeypatch):
    """A checkpoint whose fusion/neck widths differ from the spec's config is refused."""
    cache = tmp_path / "hf-cache"
    write_hub_snapshot(cache, ub.DepthAnythingV2LargeBenchmark, monkeypatch)
    proc = run_cli("--models", "dav2-large", "--runs", "1", "--no-dissect", "--images", one_image_dir,
                   "--output-dir", tmp_path / "out", env={"HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 1
    assert "features/out_channels" in proc.stdout and "Depth-Anything-V2-Large-hf" in proc.stdout


def test_a_truncated_hub_checkpoint_names_its_cache_folder_and_the_fix(tmp_path, one_image_dir, monkeypatch):
    cache = tmp_path / "hf-cache"
    write_hub_snapshot(cache, ub.DepthAnythingV2SmallBenchmark, monkeypatch)
    (weights,) = cache.rglob("model.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = run_cli("--models", "dav2-small", "--runs", "1", "--no-dissect", "--no-history", "--keep-going",
                   "--images", one_image_dir, "--output-dir", tmp_path / "out", env={"HF_HUB_CACHE": str(cache)})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    (row,) = load_report(tmp_path / "out")["results"]
    assert row["status"] == "failed" and row["failed_phase"] == "load"
    folder = str(cache / "models--depth-anything--Depth-Anything-V2-Small-hf")
    assert folder in row["error"] and "delete that folder" in row["error"] and "Traceback" not in text
