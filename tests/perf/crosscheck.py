"""Benchmark script (prints figures; not a test): this tool's numbers against independent ones.

    python tests/perf/crosscheck.py [--rounds 5]

1. Forward latency: the tool's timed forward (ModelBenchmark.infer, warm median) against
   torch.utils.benchmark.Timer.blocked_autorange() on the same model and input, interleaved
   round by round in this one process. Target: within 3% on a quiet machine.
2. --fuse --channels-last YOLO11n at the input shape Ultralytics' predict() uses for bus.jpg
   (letterboxed to 640x480) against predict()'s own speed['inference'], same process, same
   weights, interleaved. (Ultralytics' AutoBackend switches to channels-last by itself on x86
   CPUs; plain --fuse is printed too.) Target: within 10%.
3. FLOPs of fused YOLO11n / -seg / -pose at 640x640 (FlopCounterMode) against Ultralytics'
   published 6.5 / 10.4 / 7.6 GFLOPs (target: within 2%) and against Ultralytics' own counter
   (torch_utils.get_flops, thop) on the same module. And FLOPs identical in fp32 and bf16.

Random weights (latency and FLOPs do not depend on the values), CPU, nothing else running.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.benchmark import Timer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import unified_benchmark as ub  # noqa: E402

PUBLISHED_GFLOPS = {"yolo11n-detect": 6.5, "yolo11n-seg": 10.4, "yolo11n-pose": 7.6}  # Ultralytics' model table


def build(short_name: str, **options) -> ub.ModelBenchmark:
    (cls,) = ub.resolve_models(short_name)
    bench = cls(torch.device("cpu"), "random", options=ub.RunOptions(**options))
    bench.load()
    return bench


def tool_median(bench: ub.ModelBenchmark, image, runs: int) -> float:
    return statistics.median(bench.infer(image)["inference_sec"] for _ in range(runs))


def timer_median(bench: ub.ModelBenchmark, inputs) -> float:
    def forward():
        with torch.inference_mode():
            bench.run_forward(inputs)

    # Timer runs single-threaded unless told: give it the threads the tool runs with.
    return Timer(stmt="forward()", globals={"forward": forward},
                 num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=1.0).median


def latency_against_timer(image, rounds: int) -> None:
    print("== 1. forward latency: this tool vs torch.utils.benchmark.Timer.blocked_autorange() (interleaved)")
    for name in ("yolo11n-detect", "dav2-small"):
        bench = build(name)
        inputs = bench.prepare(image)
        bench.infer(image)  # first-call costs out of both
        ours, theirs = [], []
        for _ in range(rounds):  # a round: 10 timed runs of the tool, then one Timer block of about 1 s
            ours.append(tool_median(bench, image, 10))
            theirs.append(timer_median(bench, inputs))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"  {name:<15} tool {a * 1000:8.2f} ms   Timer {b * 1000:8.2f} ms   tool/Timer {a / b:.3f}  "
              f"({'within' if abs(a / b - 1) <= 0.03 else 'OUTSIDE'} 3%)")
        bench.cleanup()


def fused_yolo_against_predict(image_path: Path, image, rounds: int) -> None:
    from ultralytics import YOLO
    from ultralytics.data.augment import LetterBox

    print("== 2. --fuse YOLO11n vs Ultralytics predict() speed['inference'] (same weights, same shape, interleaved)")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "yolo11n.pt"
        ub.YOLO11nDetectBenchmark(torch.device("cpu"), "random").write_random_checkpoint(checkpoint)
        benches = {}
        for label, channels_last in (("--fuse --channels-last", True), ("--fuse", False)):
            benches[label] = ub.YOLO11nDetectBenchmark(torch.device("cpu"), "random", random_checkpoint=checkpoint,
                                                       options=ub.RunOptions(fuse=True, channels_last=channels_last))
            benches[label].load()
        yolo = YOLO(str(checkpoint))
        yolo.predict(str(image_path), imgsz=640, verbose=False)  # sets up (and fuses) its model
        shape = LetterBox((640, 640), auto=True, stride=32)(image=np.asarray(image)).shape[:2]
        x = torch.rand(1, 3, *shape)
        inputs = {label: ub.to_channels_last(x) if bench.options.channels_last else x for label, bench in benches.items()}
        ours, theirs = {label: [] for label in benches}, []
        for _ in range(rounds * 10):  # one call each, alternating: all see the same machine state
            for label, bench in benches.items():
                with torch.inference_mode():
                    start = ub.clock(bench.device)
                    bench.run_forward(inputs[label])
                    ours[label].append(ub.clock(bench.device) - start)
            theirs.append(yolo.predict(str(image_path), imgsz=640, verbose=False)[0].speed["inference"] / 1000)
        b = statistics.median(theirs)
        print(f"  input 1x3x{shape[0]}x{shape[1]}: predict() {b * 1000:.2f} ms")
        for label, times in ours.items():
            a = statistics.median(times)
            print(f"  tool {label:<24} {a * 1000:.2f} ms   tool/predict {a / b:.3f}  "
                  f"({'within' if abs(a / b - 1) <= 0.10 else 'OUTSIDE'} 10%)")


def flops_against_published() -> None:
    print("== 3. FLOPs at 640x640, fused, against Ultralytics' published GFLOPs")
    x = torch.rand(1, 3, 640, 640)
    for name, published in PUBLISHED_GFLOPS.items():
        counts = []
        for dtype in ("fp32", "bf16"):
            bench = build(name, fuse=True, dtype=dtype)
            counts.append(ub.count_flops(lambda: bench.run_forward(x, eager=True), ub.leaf_modules(bench.model))[0])
        gflops = counts[0] / 1e9
        off = gflops / published - 1
        theirs = ultralytics_gflops(bench.model)
        print(f"  {name:<15} {gflops:6.2f} GFLOPs   published {published:5.1f} ({off:+.1%}, "
              f"{'within' if abs(off) <= 0.02 else 'OUTSIDE'} 2%)   Ultralytics' get_flops {fmt(theirs)}   "
              f"fp32 == bf16: {counts[0] == counts[1]}")


def ultralytics_gflops(model) -> float | None:
    from ultralytics.utils.torch_utils import get_flops

    return get_flops(model, 640) or None  # 0.0 when thop is not installed


def fmt(value: float | None) -> str:
    return "n/a (thop not installed)" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--parts", default="1,2,3", help="which cross-checks to run (default all: 1,2,3)")
    args = parser.parse_args()
    from ultralytics.utils import ASSETS

    path = Path(ASSETS) / "bus.jpg"
    image = ub.decode_image(path)
    torch.set_num_threads(ub.usable_cpus())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image bus.jpg {image.size}, "
          f"{args.rounds} rounds")
    parts = set(args.parts.split(","))
    if "1" in parts:
        latency_against_timer(image, args.rounds)
    if "2" in parts:
        fused_yolo_against_predict(path, image, args.rounds)
    if "3" in parts:
        flops_against_published()


if __name__ == "__main__":
    main()
