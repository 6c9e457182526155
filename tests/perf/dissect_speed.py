"""Benchmark script (prints figures; not a test): single-pass vs per-layer dissection.

    python tests/perf/dissect_speed.py [--models yolo11n-detect,dav2-small]
    python tests/perf/dissect_speed.py --models depthpro     # full size, single-pass only (minutes)

For each model, random weights on the CPU, one real photo: both modes write the same
files into temporary folders; prints seconds (forward / statistics / file writing), the
speed-up ratio measured in this one run, and host memory: the peak RSS of one plain
inference against the peak RSS during single-pass dissection, next to the largest single
captured tensor.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import unified_benchmark as ub  # noqa: E402

TARGETS = {"yolo11n-detect": 25.0, "dav2-small": 120.0}  # minimum speed-ups asked for
SINGLE_PASS_ONLY = {"depthpro"}  # 956 leaf modules: the per-layer way would take hours on a CPU


def largest_tensor_mb(layers: list[dict]) -> float:
    sizes = [np.prod(l["shape"]) * torch.empty((), dtype=getattr(torch, l["dtype"])).element_size()
             for l in layers if l["shape"] and l["dtype"]]
    return max(sizes) / 1024**2


def peak_rss_mb(fn) -> float:
    ub.reset_rss_peak()
    fn()
    return ub.rss_peak_bytes() / 1024**2


def measure(short_name: str, image) -> None:
    (cls,) = ub.resolve_models(short_name)
    bench = cls(torch.device("cpu"), "random")
    bench.load()
    bench.infer(image)  # warm, so neither mode pays first-call costs (and sets the input shape)
    infer_peak = peak_rss_mb(lambda: bench.infer(image))
    with tempfile.TemporaryDirectory() as tmp:
        single = {}
        dissect_peak = peak_rss_mb(lambda: single.update(bench.dissect_layers(image, Path(tmp) / "s", verbose=False)))
        if short_name in SINGLE_PASS_ONLY:
            print(f"== {cls.__name__} (full size, single-pass only: per-layer would take one forward per leaf): "
                  f"{single['total_leaf_modules']} leaf modules, {single['total_outputs']} outputs, "
                  f"{single['total_files']} files, {single['bytes_written'] / 1024**2:.0f} MB, {single['seconds']:.1f} s "
                  f"(forward {single['seconds_forward']:.1f}, statistics {single['seconds_statistics']:.1f}, "
                  f"file writing {single['seconds_file_writing']:.1f}); peak RSS {dissect_peak:.0f} MB "
                  f"(plain inference {infer_peak:.0f} MB)")
            bench.cleanup()
            return
        per_layer = bench.dissect_layers(image, Path(tmp) / "p", "per-layer", verbose=False)
        same = sorted(p.name for p in (Path(tmp) / "s").iterdir()) == sorted(p.name for p in (Path(tmp) / "p").iterdir())
    print(f"== {cls.__name__}: {single['total_leaf_modules']} leaf modules, {single['total_outputs']} outputs, "
          f"{single['total_files']} files, {single['bytes_written'] / 1024**2:.0f} MB, same file names: {same}")
    for name, s in (("single-pass", single), ("per-layer", per_layer)):
        print(f"  {name:<12} {s['seconds']:8.2f} s  (forward {s['seconds_forward']:.2f}, statistics "
              f"{s['seconds_statistics']:.2f}, file writing {s['seconds_file_writing']:.2f} CPU s on the writer threads)")
    ratio = per_layer["seconds"] / single["seconds"]
    target = TARGETS.get(short_name)
    print(f"  speed-up     {ratio:8.1f} x" + (f"  (target >= {target:.0f}x: {'met' if ratio >= target else 'NOT met'})"
                                               if target else ""))
    largest = largest_tensor_mb(single["layers"])
    extra = dissect_peak - infer_peak
    print(f"  host memory  plain inference peak {infer_peak:.0f} MB, single-pass dissection peak {dissect_peak:.0f} MB, "
          f"extra {extra:+.0f} MB; largest captured tensor {largest:.1f} MB, bound 2x = {2 * largest:.1f} MB: "
          f"{'met' if extra <= 2 * largest else 'NOT met'}; bound 2x + 16 MB = {2 * largest + 16:.1f} MB: "
          f"{'met' if extra <= 2 * largest + 16 else 'NOT met'}")
    bench.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TARGETS))
    args = parser.parse_args()
    from ultralytics.utils import ASSETS

    image = ub.decode_image(Path(ASSETS) / "bus.jpg")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image bus.jpg {image.size}")
    for name in args.models.split(","):
        measure(name.strip(), image)


if __name__ == "__main__":
    main()
