"""The GPU check behind tests/gpu/check_cuda.sh: runs the program on CUDA as cron would and
judges what only a GPU can show. Prints one table and FAIL/SKIPPED lines; exit 0 when no check
failed (SKIPPED lines, e.g. NVML n/a, are not failures), 1 when one did, 2 without CUDA.

Parts, in this order, each with a wall-time budget (its subprocess is stopped past it) inside a
total budget (a part that no longer fits is a FAIL line, not a wait):
- dissect: YOLO11n-Detect fp32 with dissection on, --dissect-max-mb 50, --device cuda:0;
- fp16-compile: YOLO11n-Detect --dtype fp16 --compile reduce-overhead (CUDA graphs);
- fp32: all eight models, full size, random weights, with CUDA_VISIBLE_DEVICES=0 and --device cuda;
- planted: a 1 GiB allocation planted inside a forward is caught by the run's peak;
- bf16: --dtype bf16 on DA-V2 Small and MobileSAM (--bf16-models all: all eight), in one process.

Checks on every row: status ok; device "cuda:0"; CUDA events within 5% of host time where the warm
median is over 10 ms; memory returned inside the worker (mem_not_returned_mb); 0 < MFU < 1 on a
GPU with known peaks, flops_by_class / tf32 / peak_tflops present, the peak within its classes'
peaks; for fp32 YOLO11n and MobileSAM, achieved TFLOP/s under 5x the plain fp32 peak and, with
TF32 convolutions, a peak above it; energy plausible (energy_plausible), NVML "n/a" SKIPPED.
The pure functions (energy_plausible, check_row, ...) are tested on the CPU in tests/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import unified_benchmark as ub  # noqa: E402  (imports torch; does no GPU work at import)

EVENT_TOLERANCE = 0.05          # CUDA events vs perf_counter-after-synchronize
EVENT_JUDGED_ABOVE_SEC = 0.010  # shorter warm medians are not judged (launch jitter dominates)
NOT_RETURNED_MAX_MB = 64        # allocated after cleanup minus before load, inside the worker
PLANT_MB = 1024
POWER_IDLE_TOLERANCE_W = 5.0    # mean may sit this far below idle (or 5% of idle, the larger)
POWER_IDLE_TOLERANCE_FRACTION = 0.05
POWER_LIMIT_SLACK = 1.05        # mean may exceed the power limit by 5% (averaging, sensor lag)
TF32_BOUND = 5.0                # achieved TFLOP/s over the plain fp32 peak: above it, FLOPs or timings are wrong
PEAK_SLACK = 0.01
MOST_LAYERS_TIMED = 0.9         # share of dissected layers with a positive forward_ms
CONV_HEAVY_CLASSES = ("YOLO11nDetectBenchmark", "YOLO11nSegmentBenchmark", "YOLO11nPoseBenchmark",
                      "MobileSAMBenchmark")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TOTAL_BUDGET_SEC = 410.0        # with the stop grace, the wheel install and interpreter start: under 7.5 minutes
MIN_PART_SEC = 20.0             # a part with less time left is not started
MAX_MODEL_TIMEOUT_SEC = 240.0
STOP_GRACE_SEC = 10.0           # after SIGTERM the program writes its report of the finished models
RUNS = "4"
DEFAULT_BF16_MODELS = "dav2-small,mobilesam"  # a ViT and TinyViT+SAM decoder; YOLO11n runs fp16
OFFLINE_ENV = {                 # nothing can be reached on the GPU machine: never wait for the network
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "YOLO_OFFLINE": "1",        # Ultralytics' is_online() answers False without a DNS lookup: no events, no sync
    "YOLO_AUTOINSTALL": "False",  # never pip-install a missing requirement
    "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1", "YOLO_VERBOSE": "False", "PYTHONUNBUFFERED": "1",
}


class Finding(NamedTuple):
    level: str  # "FAIL" or "SKIPPED"
    text: str


def fail(text: str) -> Finding:
    return Finding("FAIL", text)


def skipped(text: str) -> Finding:
    return Finding("SKIPPED", text)


# -- pure checks ------------------------------------------------------------------------


def energy_plausible(idle_w: float | None, mean_w: float | None, limit_w: float | None) -> tuple[bool, str]:
    """Mean power while running against idle power (measured first) and the power limit. A tiny
    model may draw barely more than idle, so mean may sit a tolerance below idle; None: skipped."""
    if None in (idle_w, mean_w, limit_w):
        return True, f"skipped: no NVML power reading (idle {idle_w} W, mean {mean_w} W, limit {limit_w} W)"
    tolerance_w = max(POWER_IDLE_TOLERANCE_W, POWER_IDLE_TOLERANCE_FRACTION * idle_w)
    if idle_w <= 0:
        return False, f"idle power {idle_w} W is not positive"
    if mean_w < idle_w - tolerance_w:
        return False, f"mean {mean_w:.1f} W is more than {tolerance_w:.1f} W below idle {idle_w:.1f} W"
    if mean_w > limit_w * POWER_LIMIT_SLACK:
        return False, f"mean {mean_w:.1f} W is above the power limit {limit_w:.1f} W (+5%)"
    return True, f"idle {idle_w:.1f} W, mean {mean_w:.1f} W, limit {limit_w:.1f} W"


def events_finding(host_sec: float | None, events_sec: float | None) -> Finding | None:
    """CUDA events vs host time, judged only where the warm median is over 10 ms."""
    if host_sec is None:
        return fail("no warm_median_sec")
    if host_sec <= EVENT_JUDGED_ABOVE_SEC:
        return None
    if events_sec is None:
        return fail(f"no warm_median_event_sec (host {host_sec * 1000:.2f} ms)")
    diff = events_sec / host_sec - 1
    if abs(diff) > EVENT_TOLERANCE:
        return fail(f"CUDA events {events_sec * 1000:.2f} ms vs host {host_sec * 1000:.2f} ms ({diff:+.1%}, over 5%)")
    return None


def memory_finding(row: dict) -> Finding | None:
    not_returned_mb = row.get("mem_not_returned_mb")
    if not isinstance(not_returned_mb, (int, float)):
        return fail(f"mem_not_returned_mb is {not_returned_mb!r}")
    if not_returned_mb > NOT_RETURNED_MAX_MB:
        return fail(f"{not_returned_mb:.0f} MB not returned after cleanup (over {NOT_RETURNED_MAX_MB} MB)")
    return None


def nvml_findings(row: dict, pynvml_installed: bool = True) -> list[Finding]:
    """NVML "n/a: why" (or nvidia-ml-py missing) is SKIPPED; with NVML, the energy must be plausible."""
    nvml = row.get("nvml")
    if isinstance(nvml, str) and nvml.startswith("n/a"):
        return [skipped(f"energy: NVML {nvml}")]
    if nvml is None and not pynvml_installed:
        return [skipped("energy: nvidia-ml-py is not installed")]
    if nvml != "ok":
        return [fail(f"nvml is {nvml!r}, not 'ok' or 'n/a: why'")]
    ok, reason = energy_plausible(row.get("power_idle_w"), row.get("power_mean_w"), row.get("power_limit_w"))
    if not ok:
        return [fail(f"energy: {reason}")]
    if reason.startswith("skipped") or row.get("energy_j_per_inference") is None:
        return [skipped(f"energy: NVML ok but {reason}; J/inference {row.get('energy_j_per_inference')}")]
    return []


def class_peaks_tflops(dtype: str | None, tf32: dict, peaks: dict[str, float | None]) -> dict[str, float | None]:
    """Each FLOP class's peak: fp16/bf16 under autocast; fp32 as tf32 where its flag allowed it."""
    if dtype != "fp32":
        return {"conv": peaks.get(dtype), "matmul": peaks.get(dtype)}
    return {k: peaks.get("tf32" if tf32.get(k) else "fp32") for k in ("conv", "matmul")}


def flop_fields_findings(row: dict) -> list[Finding]:
    found = []
    by_class, tf32, peak = row.get("flops_by_class"), row.get("tf32"), row.get("peak_tflops")
    if not (isinstance(by_class, dict) and all(isinstance(by_class.get(k), int) for k in ("conv", "matmul"))):
        found.append(fail(f"flops_by_class is {by_class!r}, not {{'conv': N, 'matmul': N}}"))
    if not (isinstance(tf32, dict) and all(isinstance(tf32.get(k), bool) for k in ("conv", "matmul"))):
        found.append(fail(f"tf32 is {tf32!r}, not {{'conv': bool, 'matmul': bool}}"))
    if not (isinstance(peak, (int, float)) and peak > 0):
        found.append(fail(f"peak_tflops is {peak!r}"))
    return found


def mix_peak_finding(row: dict, peaks: dict[str, float | None]) -> Finding | None:
    """The row's peak (of its FLOP mix) lies between the peaks of the classes it has FLOPs in."""
    used = [p for k, p in class_peaks_tflops(row.get("dtype"), row["tf32"], peaks).items() if row["flops_by_class"][k]]
    if not used or None in used:
        return fail(f"no data-sheet peak for the classes of {row['flops_by_class']} ({row.get('dtype')})")
    low, high, peak = min(used), max(used), row["peak_tflops"]
    if not low * (1 - PEAK_SLACK) <= peak <= high * (1 + PEAK_SLACK):
        return fail(f"peak_tflops {peak:.1f} outside its classes' peaks {low:.1f}..{high:.1f}")
    return None


def tf32_bound_findings(row: dict, fp32_peak_tflops: float) -> list[Finding]:
    """fp32 YOLO11n and MobileSAM (convolutions): achieved under 5x plain fp32; TF32 conv: peak above it."""
    if row.get("class_name") not in CONV_HEAVY_CLASSES or row.get("dtype") != "fp32":
        return []
    found = []
    achieved = row.get("achieved_tflops")
    if not isinstance(achieved, (int, float)) or achieved / fp32_peak_tflops >= TF32_BOUND:
        found.append(fail(f"achieved {achieved} TFLOP/s is not under {TF32_BOUND}x the plain fp32 peak "
                          f"{fp32_peak_tflops} (FLOPs or timings wrong)"))
    if row["tf32"].get("conv") and not row["peak_tflops"] > fp32_peak_tflops:
        found.append(fail(f"TF32 convolutions but peak {row['peak_tflops']} TFLOP/s is not above plain fp32 "
                          f"{fp32_peak_tflops}"))
    return found


def compute_findings(row: dict, peaks: dict[str, float | None]) -> list[Finding]:
    """MFU, the FLOP fields and the peak, where the GPU's data-sheet peaks are known."""
    found = flop_fields_findings(row)
    fp32_peak = peaks.get("fp32")
    if fp32_peak is None:
        return found + [skipped("MFU: no data-sheet peak for this GPU")]
    mfu = row.get("mfu")
    if not (isinstance(mfu, (int, float)) and 0 < mfu < 1):
        found.append(fail(f"MFU {mfu} is not in (0, 1) (peak {row.get('peak_tflops')} for {row.get('peak_precision')})"))
    if found:
        return found
    mix = mix_peak_finding(row, peaks)
    return ([mix] if mix else []) + tf32_bound_findings(row, fp32_peak)


def check_row(row: dict, peaks: dict[str, float | None], pynvml_installed: bool = True) -> list[Finding]:
    """Every check on one report row (read with .get(): a missing field is a FAIL, not a KeyError)."""
    if row.get("status") != "ok":
        return [fail(f"status {row.get('status')!r}: {row.get('error')}")]
    found = [] if row.get("device") == "cuda:0" else [fail(f"device {row.get('device')!r}, not 'cuda:0'")]
    found += [f for f in (events_finding(row.get("warm_median_sec"), row.get("warm_median_event_sec")),
                          memory_finding(row)) if f]
    return found + compute_findings(row, peaks) + nvml_findings(row, pynvml_installed)


def onnxruntime_skip(providers: list[str] | None) -> str | None:
    """Why the onnxruntime part cannot run on this machine (providers: onnxruntime's available
    providers, None when it is not installed), or None when it can."""
    if providers is None:
        return "onnxruntime is not installed here"
    if "CUDAExecutionProvider" not in providers:
        return f"this onnxruntime has no CUDAExecutionProvider ({', '.join(providers)}): it is not onnxruntime-gpu"
    return None


def runtime_row_findings(row: dict) -> list[Finding]:
    """A runtime's row on CUDA: on the GPU (no silent CPU fallback), its CPU-placed nodes counted,
    parity ok, a speed-up against the torch row, NVML memory, no CUDA events (its own streams)."""
    if row.get("status") != "ok":
        return [fail(f"status {row.get('status')!r}: {row.get('error')}")]
    found = []
    for key, want in (("device", "cuda:0"), ("runtime_device", "CUDA:0"), ("parity", "ok"),
                      ("mem_kind", "gpu_process_nvml"), ("warm_median_event_sec", None)):
        if row.get(key) != want:
            found.append(fail(f"{key} is {row.get(key)!r}, not {want!r}"))
    if "CUDAExecutionProvider" not in (row.get("runtime_settings") or {}).get("providers", []):
        found.append(fail(f"providers {(row.get('runtime_settings') or {}).get('providers')!r} lack CUDA's"))
    if (row.get("runtime_settings") or {}).get("io_binding") != "cuda:0":
        found.append(fail(f"io_binding {(row.get('runtime_settings') or {}).get('io_binding')!r}, not 'cuda:0'"))
    if not isinstance(row.get("runtime_cpu_nodes"), int):
        found.append(fail(f"runtime_cpu_nodes is {row.get('runtime_cpu_nodes')!r}, not a count"))
    on_gpu = (row.get("runtime_nodes_by_provider") or {}).get("CUDAExecutionProvider") or 0
    if on_gpu <= 0:
        found.append(fail(f"no node on CUDAExecutionProvider ({row.get('runtime_nodes_by_provider')!r})"))
    if not (isinstance(row.get("speedup_vs_baseline"), (int, float)) and row["speedup_vs_baseline"] > 0):
        found.append(fail(f"speedup_vs_baseline is {row.get('speedup_vs_baseline')!r}"))
    peak = row.get("mem_peak_mb")
    if peak is None and row.get("mem_note"):
        found.append(skipped(f"runtime memory: {row['mem_note']}"))
    elif not (isinstance(peak, (int, float)) and peak > 0):
        found.append(fail(f"mem_peak_mb is {peak!r} with NVML {row.get('nvml')!r}"))
    return found


def dissection_findings(row: dict, meta: dict | None, file_exists: Callable[[str], bool]) -> list[Finding]:
    """(a): complete, files written, layers timed in a separate pass with positive times, PNGs there."""
    found = []
    if row.get("dissect_status") != "complete":
        found.append(fail(f"dissect_status {row.get('dissect_status')!r}"))
    if not (isinstance(row.get("dissect_files"), int) and row["dissect_files"] > 0):
        found.append(fail(f"dissect_files {row.get('dissect_files')!r}"))
    if "separate pass" not in str(row.get("layer_timing")):
        found.append(fail(f"layer_timing {row.get('layer_timing')!r}, not a separate pass"))
    if meta is None:
        return found + [fail("no layers_metadata.json")]
    layers = meta.get("layers") or []
    timed = sum(1 for layer in layers if (layer.get("forward_ms") or 0) > 0)
    if not layers or timed < MOST_LAYERS_TIMED * len(layers):
        found.append(fail(f"{timed} of {len(layers)} layers have a positive forward_ms"))
    pngs = [f for layer in layers for f in layer.get("files") or [] if f.endswith(".png")]
    missing = [f for f in pngs if not file_exists(f)]
    if not pngs or missing:
        found.append(fail(f"{len(pngs)} PNG files listed, missing: {missing[:3]}"))
    return found


def compile_findings(row: dict) -> list[Finding]:
    """(b): reduce-overhead records CUDA graphs: an eager and a recording call per shape before the samples."""
    found = []
    calls = row.get("compile_calls")
    if not (isinstance(calls, int) and calls >= 2):
        found.append(fail(f"compile_calls {calls!r}, expected >= 2 (CUDA graphs)"))
    if not row.get("compile_sec"):
        found.append(fail(f"compile_sec {row.get('compile_sec')!r}"))
    return found


def planted_findings(plain_mb: float | None, planted_mb: float | None) -> list[Finding]:
    if plain_mb is None or planted_mb is None:
        return [fail(f"planted {PLANT_MB} MB: no peak figures ({plain_mb}, {planted_mb})")]
    if planted_mb - plain_mb < PLANT_MB * 0.99:
        return [fail(f"planted {PLANT_MB} MB: peak {planted_mb:.0f} MB vs {plain_mb:.0f} MB without")]
    return []


def missing_rows(expected_classes: list[str], rows: list[dict]) -> list[str]:
    present = {r.get("class_name") for r in rows}
    return [c for c in expected_classes if c not in present]


def part_timeout_sec(budget_sec: float, left_sec: float) -> float | None:
    """The part's budget, cut to the total time left; None when too little is left to start it."""
    timeout = min(budget_sec, left_sec)
    return timeout if timeout >= MIN_PART_SEC else None


def model_timeout_sec(part_limit_sec: float, part_timeout_sec: float) -> float:
    return max(10.0, min(MAX_MODEL_TIMEOUT_SEC, part_limit_sec, part_timeout_sec - 10))


# -- the table ---------------------------------------------------------------------------

HEADER = ["model", "part", "status", "checks", "host ms", "events ms", "diff", "GFLOPs", "TFLOP/s",
          "peak TFLOP/s", "MFU", "J/inf", "W mean/idle", "peak MB", "not returned MB"]


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return format(value * scale, spec) if isinstance(value, (int, float)) else "n/a"


def checks_cell(findings: list[Finding]) -> str:
    fails = sum(f.level == "FAIL" for f in findings)
    skips = sum(f.level == "SKIPPED" for f in findings)
    return f"{fails} FAIL" if fails else (f"pass ({skips} skipped)" if skips else "pass")


def table_row(part: str, row: dict, findings: list[Finding]) -> list[str]:
    host, events = row.get("warm_median_sec"), row.get("warm_median_event_sec")
    diff = events / host - 1 if isinstance(events, (int, float)) and isinstance(host, (int, float)) and host else None
    mean, idle = row.get("power_mean_w"), row.get("power_idle_w")
    return [str(row.get("model_name") or row.get("class_name")), part, str(row.get("status")), checks_cell(findings),
            fmt(host, ".2f", 1000), fmt(events, ".2f", 1000), fmt(diff, "+.1%"), fmt(row.get("gflops"), ".1f"),
            fmt(row.get("achieved_tflops"), ".2f"), fmt(row.get("peak_tflops"), ".1f"), fmt(row.get("mfu"), ".1%"),
            fmt(row.get("energy_j_per_inference"), ".3f"), f"{fmt(mean, '.0f')}/{fmt(idle, '.0f')}",
            fmt(row.get("mem_peak_mb"), ".0f"), fmt(row.get("mem_not_returned_mb"), "+.0f")]


def placeholder_row(name: str, part: str, status: str, checks: str = "1 FAIL") -> list[str]:
    return [name, part, status, checks] + ["-"] * (len(HEADER) - 4)


def render_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# -- running the parts (I/O) ---------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    name: str
    args: tuple[str, ...]
    budget_sec: float
    model_limit_sec: float = MAX_MODEL_TIMEOUT_SEC
    env: dict = field(default_factory=dict)
    models: str | None = None   # --models; None: all eight


def plan_parts(bf16_models: str) -> list[Part]:
    """The parts in order, most telling first; budgets from the estimates in the README."""
    yolo = "yolo11n-detect"
    return [
        Part("dissect", ("--device", "cuda:0", "--dissect-max-mb", "50"), 60, 50, models=yolo),
        Part("fp16-compile", ("--device", "cuda", "--no-dissect", "--dtype", "fp16", "--compile", "reduce-overhead"),
             150, 140, models=yolo),
        Part("fp32", ("--device", "cuda", "--no-dissect"), 190, 90, env={"CUDA_VISIBLE_DEVICES": "0"}),
        Part("onnxruntime", ("--device", "cuda", "--no-dissect", "--backend", "torch,onnxruntime"), 80, 70,
             models="yolo11n-detect,dav2-small"),  # skipped where onnxruntime has no CUDA provider
        Part("planted", (), 40),  # in-process, in a subprocess of this script: not a program run
        Part("bf16", ("--device", "cuda:0", "--no-dissect", "--dtype", "bf16", "--runs", "2", "--isolation", "none"),
             50, 40, models=None if bf16_models == "all" else bf16_models),
    ]


class Stopped(Exception):
    """SIGTERM (the shell's timeout) reached the check: stop the part in flight, print the table."""


def stop_process_tree(proc: subprocess.Popen) -> None:
    """SIGTERM first (the program forwards it to its worker and writes the report of the finished
    models), then SIGKILL to whatever of its tree is left (workers run in sessions of their own)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_SEC)
    except subprocess.TimeoutExpired:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()


def run_with_timeout(cmd: list[str], env: dict, timeout_sec: float) -> int | None:
    """The command's exit code, its output passed through to ours; None when it ran past timeout_sec."""
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_sec)
    except subprocess.TimeoutExpired:
        stop_process_tree(proc)
        return None
    except BaseException:
        stop_process_tree(proc)
        raise


def child_env(extra: dict) -> dict:
    return {**os.environ, **OFFLINE_ENV, **extra}


def asset_images() -> Path:
    """Ultralytics' two sample photos (bus.jpg, zidane.jpg), found without importing it."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        raise RuntimeError("Ultralytics is not importable (check_cuda.sh installs it from .whl/)")
    return Path(spec.origin).parent / "assets"


def program_command(part: Part, out: Path, timeout_sec: float) -> list[str]:
    models = ("--models", part.models) if part.models else ()
    runs = () if "--runs" in part.args else ("--runs", RUNS)
    # --model-timeout stops a worker process: with --isolation none the part's budget bounds it.
    limit = () if "none" in part.args else (
        "--model-timeout", f"{model_timeout_sec(part.model_limit_sec, timeout_sec):.0f}")
    return [sys.executable, str(REPO / "unified_benchmark.py"), "--weights", "random", "--keep-going", "--no-history",
            "--images", str(asset_images()), "--output-dir", str(out), *limit, *runs, *models, *part.args]


def newest_report(out: Path) -> dict | None:
    reports = sorted((out / "results").glob("benchmark_results_*.json"))
    return json.loads(reports[-1].read_text(encoding="utf-8")) if reports else None


@dataclass
class Outcome:
    findings: list[tuple[str, Finding]] = field(default_factory=list)  # (where, finding)
    table: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, where: str, found: list[Finding]) -> None:
        self.findings += [(where, f) for f in found]


def run_part(part: Part, out: Path, timeout_sec: float) -> tuple[dict | None, str | None]:
    """(the report, or None; why the part itself failed, or None)."""
    cmd = program_command(part, out, timeout_sec)
    print(f"\n=== part {part.name} (timeout {timeout_sec:.0f} s) ===\n$ {' '.join(cmd[1:])}", flush=True)
    code = run_with_timeout(cmd, child_env(part.env), timeout_sec)
    report = newest_report(out)
    if code is None:
        return report, f"timed out after {timeout_sec:.0f} s"
    if code not in (0, 1):
        return report, f"exit {code}"
    return report, None if report else "no report written"


def judge_part(part: Part, report: dict | None, problem: str | None, ctx: dict, outcome: Outcome) -> None:
    rows = (report or {}).get("results") or []
    if problem:
        outcome.add(f"part {part.name}", [fail(problem)])
    for row in rows:
        where = f"{row.get('model_name') or row.get('class_name')} {part.name}"
        found = (runtime_row_findings(row) if row.get("runtime", "torch") != "torch"
                 else check_row(row, ctx["peaks"], ctx["pynvml_installed"]) + part_specific_findings(part, row))
        outcome.add(where, found)
        outcome.table.append(table_row(part.name, row, found))
        if row.get("gpu_own_process"):
            outcome.notes.append(f"{where}: own process told apart by {row['gpu_own_process']}")
        if row.get("compile_mode"):
            outcome.notes.append(f"{where}: compile_sec {fmt(row.get('compile_sec'), '.1f')}, compile_calls "
                                 f"{row.get('compile_calls')}, recompilations {row.get('recompilations')}")
    for cls in missing_rows([c.__name__ for c in ub.resolve_models(part.models)], rows):
        outcome.add(f"{cls} {part.name}", [fail("no row in the report")])
        outcome.table.append(placeholder_row(cls, part.name, "missing"))


def part_specific_findings(part: Part, row: dict) -> list[Finding]:
    if row.get("status") != "ok":
        return []  # check_row reports it
    if part.name == "dissect":
        return dissection_findings(row, *dissection_files(row))
    if part.name == "fp16-compile":
        return compile_findings(row)
    return []


def dissection_files(row: dict) -> tuple[dict | None, Callable[[str], bool]]:
    viz = Path(row.get("viz_dir") or "/nonexistent")
    meta_path = viz / "layers_metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    return meta, lambda name: (viz / name).is_file()


def planted_peak_mb() -> tuple[float, float]:
    """Peak of a plain forward and of one that also holds 1 GiB, same process (--planted)."""
    import torch

    class Planted(ub.YOLO11nDetectBenchmark):
        def forward(self, inputs):
            ballast = torch.empty(PLANT_MB * 1024**2, dtype=torch.uint8, device=self.device)
            out = super().forward(inputs)
            del ballast
            return out

    image = ub.decode_image(asset_images() / "bus.jpg")
    figures = []
    for cls in (ub.YOLO11nDetectBenchmark, Planted):
        bench = cls(torch.device("cuda"), "random")
        bench.load()
        bench.infer(image)
        figures.append(bench.infer(image)["peak_cuda_allocated_mb"])
        bench.cleanup()
    return figures[0], figures[1]


def run_planted(timeout_sec: float, outcome: Outcome) -> None:
    print(f"\n=== part planted (timeout {timeout_sec:.0f} s) ===", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--planted"]
    try:
        done = subprocess.run(cmd, env=child_env({}), capture_output=True, text=True, timeout=timeout_sec)
    except subprocess.TimeoutExpired:
        outcome.add("planted", [fail(f"timed out after {timeout_sec:.0f} s")])
        outcome.table.append(placeholder_row("YOLO11n-Detect + 1 GiB", "planted", "timed out"))
        return
    print(done.stdout[-3000:] + done.stderr[-3000:], end="")
    try:
        plain_mb, planted_mb = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        plain_mb = planted_mb = None
    found = planted_findings(plain_mb, planted_mb)
    outcome.add("planted", found)
    outcome.table.append(["YOLO11n-Detect + 1 GiB", "planted", f"exit {done.returncode}", checks_cell(found)]
                         + ["-"] * (len(HEADER) - 6) + [fmt(planted_mb, ".0f"), f"plain {fmt(plain_mb, '.0f')}"])
    outcome.notes.append(f"planted {PLANT_MB} MB: peak {plain_mb} -> {planted_mb} MB")


def device_peaks(device_name: str, outcome: Outcome) -> dict[str, float | None]:
    peak_for = getattr(ub, "peak_tflops_for", None)
    if peak_for is None:
        outcome.add("unified_benchmark", [fail("has no peak_tflops_for(device_name, precision)")])
        return {p: None for p in PRECISIONS}
    return {p: peak_for(device_name, p) for p in PRECISIONS}


def ort_providers() -> list[str] | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    return onnxruntime.get_available_providers()


def part_failed(part: Part, why: str, status: str, outcome: Outcome) -> None:
    outcome.add(f"part {part.name}", [fail(why)])
    outcome.table.append(placeholder_row(f"(part {part.name})", part.name, status))


def run_all(args: argparse.Namespace, ctx: dict, outcome: Outcome) -> None:
    deadline = time.monotonic() + args.budget_sec
    for part in plan_parts(args.bf16_models):
        if args.parts and part.name not in args.parts:
            continue
        timeout = part_timeout_sec(part.budget_sec, deadline - time.monotonic())
        if timeout is None:
            part_failed(part, f"not run: the {args.budget_sec:.0f} s budget is spent", "not run", outcome)
            continue
        start = time.monotonic()
        try:
            if part.name == "planted":
                run_planted(timeout, outcome)
            elif part.name == "onnxruntime" and (why := onnxruntime_skip(ort_providers())):
                outcome.add(f"part {part.name}", [skipped(why)])
                outcome.table.append(placeholder_row("(part onnxruntime)", part.name, "skipped", "1 SKIPPED"))
            else:
                report, problem = run_part(part, args.out / part.name, timeout)
                judge_part(part, report, problem, ctx, outcome)
        except Exception as e:  # a broken part is a FAIL line and a row; the others still run
            part_failed(part, f"raised {type(e).__name__}: {e}", "error", outcome)
        wall = f"part {part.name}: {time.monotonic() - start:.0f} s wall (budget {part.budget_sec:.0f} s)"
        outcome.notes.append(wall)
        print(f"--- {wall}", flush=True)


def print_summary(outcome: Outcome, wall_sec: float) -> int:
    print("\n" + render_table(outcome.table) + "\n")
    for note in outcome.notes:
        print(note)
    for level in ("SKIPPED", "FAIL"):
        for where, f in outcome.findings:
            if f.level == level:
                print(f"{level} {where}: {f.text}")
    fails = sum(f.level == "FAIL" for _, f in outcome.findings)
    skips = sum(f.level == "SKIPPED" for _, f in outcome.findings)
    print(f"total wall time {wall_sec:.0f} s")
    print("GPU check:", f"{fails} FAILED" if fails else "PASSED", f"({skips} SKIPPED)" if skips else "")
    return 1 if fails else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where the reports go (default: a temporary folder)")
    parser.add_argument("--budget-sec", type=float, default=TOTAL_BUDGET_SEC, help="total wall-time budget")
    parser.add_argument("--bf16-models", default=DEFAULT_BF16_MODELS, help="--models of the bf16 part, or 'all'")
    parser.add_argument("--parts", type=lambda s: set(s.split(",")), help="only these parts (comma-separated)")
    parser.add_argument("--planted", action="store_true", help=argparse.SUPPRESS)  # the planted part's subprocess
    return parser.parse_args(argv)


def raise_stopped(signum, frame):
    raise Stopped(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("check_cuda: no CUDA device here")
        return 2
    if args.planted:
        print(json.dumps(planted_peak_mb()))
        return 0
    started = time.monotonic()
    args.out = args.out or Path(tempfile.mkdtemp(prefix="vision-bench-gpu-"))
    name = torch.cuda.get_device_name(0)
    print(f"GPU {name}, torch {torch.__version__}, reports in {args.out}", flush=True)
    outcome = Outcome()
    ctx = {"peaks": device_peaks(name, outcome), "pynvml_installed": importlib.util.find_spec("pynvml") is not None}
    signal.signal(signal.SIGTERM, raise_stopped)
    try:
        run_all(args, ctx, outcome)
    except (Stopped, KeyboardInterrupt) as e:
        outcome.add("check", [fail(f"stopped ({e or 'interrupt'}): the parts after it did not run")])
    return print_summary(outcome, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
