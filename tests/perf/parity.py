"""Benchmark script (prints figures; not a test): the accuracy cost of every variant.

    python tests/perf/parity.py [--rounds 5] [--models yolo11n-detect,dav2-small,mobilesam]
                                [--variants fuse,channels-last,bf16,compile]

Per model and variant, in this one process on bus.jpg, random weights, full-size architectures:
the speed-up of the variant's forward against fp32 eager (warm medians, the two interleaved round
by round), the parity verdict (check_parity, the same code a run uses), the worst raw relative
error, and the first layer that drifts (a hooked forward of each; n/a for --compile). Then the
extra peak RSS of the layer comparison against its bound: twice the largest layer output plus
64 MB. These figures chose PARITY_THRESHOLDS (README: Accuracy cost). Nothing else running.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.pop("VISION_BENCH_REDUCED_CONFIG", None)  # the real sizes

import unified_benchmark as ub  # noqa: E402
from ultralytics.utils import ASSETS  # noqa: E402

VARIANTS = {"fuse": {"fuse": True}, "channels-last": {"channels_last": True}, "bf16": {"dtype": "bf16"},
            "compile": {"compile": "default"}}


def build(short_name: str, **options) -> ub.ModelBenchmark:
    (cls,) = ub.resolve_models(short_name)
    bench = cls(torch.device("cpu"), "random", options=ub.RunOptions(**options))
    bench.load()
    return bench


def forward_sec(bench: ub.ModelBenchmark, inputs) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        bench.run_forward(inputs)
    return time.perf_counter() - start


def speedup(base: ub.ModelBenchmark, variant: ub.ModelBenchmark, image, rounds: int) -> float:
    """fp32 eager warm median over the variant's, interleaved (one warm-up call each first)."""
    a, b = base.prepare(image), variant.prepare(image)
    forward_sec(base, a), forward_sec(variant, b)
    times_a, times_b = [], []
    for _ in range(rounds):
        times_a.append(forward_sec(base, a))
        times_b.append(forward_sec(variant, b))
    return statistics.median(times_a) / statistics.median(times_b)


def row(model: str, name: str, base, image, rounds: int) -> list[str]:
    variant = build(model, **VARIANTS[name])
    if variant.options.compile:
        variant.compile([image])
    ratio = speedup(base, variant, image, rounds)
    found = ub.check_parity(variant, [("bus.jpg", image)], layers=True)
    drift = found.get("parity_first_drift")
    first = (found.get("parity_layer_note") or "n/a") if "parity_layers" not in found else (
        f"{drift['name']} ({drift['rel_err']:.1e})" if drift else f"none above {found['parity_layer_limit']:g}")
    extra = (f"{found['parity_layers_extra_rss_mb']:.0f} / {2 * found['parity_largest_output_mb'] + 64:.0f}"
             if "parity_layers_extra_rss_mb" in found else "n/a")
    agreement = found["parity_note"] or f"{found['parity_agreement']:.3f}"
    variant.cleanup()
    return [model, name, f"{ratio:.2f}x", found["parity"], f"{found['parity_rel_l2_max']:.1e}", agreement, first, extra]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="yolo11n-detect,dav2-small,mobilesam")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    image = ub.decode_image(Path(ASSETS) / "bus.jpg")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    header = ["model", "variant", "speed-up vs fp32 eager", "verdict", "worst rel err", "task agreement",
              "first drifting layer", "extra RSS MB / bound"]
    lines = []
    for model in args.models.split(","):
        base = build(model)
        for name in args.variants.split(","):
            lines.append(row(model, name, base, image, args.rounds))
            print(" | ".join(lines[-1]), flush=True)
        base.cleanup()
    print(f"\ntorch {torch.__version__}, {ub.cpu_model()}, {torch.get_num_threads()} threads, {args.rounds} rounds\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for line in lines:
        print("| " + " | ".join(line) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
