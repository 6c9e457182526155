"""Benchmark script (prints figures; not a test): which runtime to ship, and what it costs.

    python tests/perf/backends.py [--rounds 10] [--models yolo11n-detect,dav2-small,mobilesam]

Per model, in this one process on bus.jpg, random weights, full-size architectures: the warm
median of the forward on PyTorch eager, ONNX Runtime (CPU) and OpenVINO (CPU), the three
interleaved round by round; each runtime's speed-up against eager, its export time and size
(a fresh export, not the cache) and its parity verdict (check_parity, the code a run uses).
Then YOLO11n on this program's ONNX Runtime row against Ultralytics' own ONNX export of the
same weights run through its predict() at the same 640x640 input (its speed['inference']; its
session rebuilt with this program's threads and graph optimisation; its graph returns the
decoded boxes only, ours the raw head outputs too), interleaved round by round, warm medians.
Nothing else running.
"""

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.pop("VISION_BENCH_REDUCED_CONFIG", None)  # the real sizes

import unified_benchmark as ub  # noqa: E402
from PIL import Image  # noqa: E402
from ultralytics.utils import ASSETS  # noqa: E402

BUS = Path(ASSETS) / "bus.jpg"


def build(short_name: str, backend: str) -> ub.ModelBenchmark:
    (cls,) = ub.resolve_models(short_name)
    bench = cls(torch.device("cpu"), "random", options=ub.RunOptions(backend=backend))
    bench.load()
    return bench


def with_runtime(bench: ub.ModelBenchmark, image: Image.Image, exports: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    export = ub.export_onnx(bench, image, exports)
    export_sec = time.perf_counter() - start
    bench.runtime = ub.RUNTIMES[bench.options.backend](export, ub.usable_cpus(), bench.device, None)
    return export_sec, export


def one_model(short_name: str, rounds: int, image: Image.Image, exports: Path) -> list[list[str]]:
    benches = {backend: build(short_name, backend) for backend in ("torch", "onnxruntime", "openvino")}
    exported = {b: with_runtime(bench, image, exports / b) for b, bench in benches.items() if b != "torch"}
    for bench in benches.values():  # the cold runs, not counted
        bench.infer(image)
    samples: dict[str, list[float]] = {b: [] for b in benches}
    for _ in range(rounds):
        for backend, bench in benches.items():
            samples[backend].append(bench.infer(image)["inference_sec"])
    eager = statistics.median(samples["torch"])
    lines = []
    for backend, bench in benches.items():
        median = statistics.median(samples[backend])
        if backend == "torch":
            lines.append([short_name, backend, f"{median * 1000:.1f}", "1.00x", "-", "-", "reference"])
            continue
        export_sec, export = exported[backend]
        parity = ub.check_parity(bench, [(BUS.name, image)], layers=False)
        lines.append([short_name, backend, f"{median * 1000:.1f}", f"{eager / median:.2f}x", f"{export_sec:.1f}",
                      f"{export['mb']:.1f}", f"{parity['parity']} ({parity['parity_rel_l2_max']:.1e})"])
    for bench in benches.values():
        bench.cleanup()
    return lines


def against_ultralytics(rounds: int, image: Image.Image, exports: Path) -> tuple[float, float]:
    """YOLO11n on this program's ONNX Runtime row against Ultralytics' own ONNX export of the same
    random weights run by its predict() (its speed['inference'], 640x640 as this program feeds it),
    interleaved round by round: (ours, theirs), warm medians in seconds."""
    from ultralytics import YOLO

    bench = build("yolo11n-detect", "onnxruntime")
    with_runtime(bench, image, exports / "ours")
    checkpoint = exports / "yolo11n-random.pt"
    torch.save({"model": bench.model, "train_args": {}}, checkpoint)  # Ultralytics' checkpoint layout
    with contextlib.redirect_stdout(io.StringIO()):
        path = YOLO(str(checkpoint)).export(format="onnx", imgsz=640, opset=ub.ONNX_OPSET, simplify=False,
                                            dynamic=False, verbose=False)
    theirs = YOLO(str(path), task="detect")
    bench.infer(image), theirs.predict(str(BUS), imgsz=640, verbose=False)  # the cold runs, not counted
    # Ultralytics creates its session with ONNX Runtime's defaults: ours has the same threads and
    # graph optimisation, so that the two differ only in the graph and the code around run().
    import onnxruntime as ort

    settings = ort.SessionOptions()
    settings.intra_op_num_threads = ub.usable_cpus()
    settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    theirs.predictor.model.backend.session = ort.InferenceSession(str(path), settings, providers=[ub.CPU_PROVIDER])
    ours_sec, theirs_sec = [], []
    for _ in range(rounds):
        ours_sec.append(bench.infer(image)["inference_sec"])
        theirs_sec.append(theirs.predict(str(BUS), imgsz=640, verbose=False)[0].speed["inference"] / 1000)
    bench.cleanup()
    return statistics.median(ours_sec), statistics.median(theirs_sec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--models", default="yolo11n-detect,dav2-small,mobilesam")
    args = parser.parse_args()
    torch.set_num_threads(ub.usable_cpus())
    image = ub.decode_image(BUS)
    header = ["model", "backend", "warm ms", "vs eager", "export s", "export MB", "parity (worst rel. error)"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vision-bench-backends-") as tmp:
        for name in args.models.split(","):
            rows += one_model(name, args.rounds, image, Path(tmp))
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        print(f"torch {torch.__version__}, {ub.usable_cpus()} CPU threads, {args.rounds} interleaved rounds, "
              f"bus.jpg, random weights")
        for row in [header] + rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if "yolo11n-detect" in args.models.split(","):
            ours, theirs = against_ultralytics(args.rounds, image, Path(tmp))
            print(f"YOLO11n 640x640 on ONNX Runtime, the same weights, {args.rounds} interleaved rounds: this program "
                  f"{ours * 1000:.1f} ms, Ultralytics' export through predict() {theirs * 1000:.1f} ms: "
                  f"ratio {ours / theirs:.2f} (this program's time over Ultralytics')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
