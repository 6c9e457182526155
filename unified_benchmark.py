#!/usr/bin/env python3
"""vision-bench: benchmark eight vision models one after another and dissect every layer.

Per model: load time, cold and warm forward latency (preprocessing and postprocessing
timed beside it), FPS, host and CUDA memory, parameters, and a dissection of every leaf
module's output (PNG + NPY + layers_metadata.json). Reports: JSON, CSV and Markdown
under results/, pictures under viz/<timestamp>/<ClassName>/.

    python unified_benchmark.py                         # all eight models, pretrained weights
    python unified_benchmark.py --weights random --models yolo11n-detect,mobilesam
    python unified_benchmark.py --help

Importing this module has no side effects; main(argv) returns the exit code. Each model
runs in a fresh worker process that runs this same file (--isolation none: in this one).

Sections, in dependency order:
    Constants and logging     exit codes, log(), the errors a user can act on
    Utilities                 images, files, versions
    CUDA and NVML             every torch.cuda and NVML call, and the pure device decisions
    Timing and memory         seeds, clocks, peaks, runtime init, module-call counter, host activity
    Deployment and compute    --dtype/--compile/--fuse/--threads, FLOPs by class, peaks, MFU, energy
    Statistics                pure functions: latency statistics, noise verdicts, time left
    Layer dissection          hooks on every leaf, pictures and arrays, per-layer times
    The base class            ModelBenchmark: everything the models share
    The eight models          one subclass each, MODEL_REGISTRY, what each needs (preflight)
    Runtimes                  --backend: the ONNX export (cached), ONNX Runtime (CPU, CUDA, TensorRT), OpenVINO
    Accuracy cost             every variant against the fp32 eager reference, the first layer that drifts
    One model's benchmark     the phases of one model, run inside its worker
    Progress journal          each finished row fsync'd at once; a dead run's rows read back
    The runner                worker processes, supervised: crashes, timeouts, signals
    History and verdicts      SQLite run history, regression verdicts, comparison
    Reports and plots         JSON, CSV, Markdown, plots
    Trend site                results/index.html: every run of the history, charts, filters
    Executors                 the suite here (local) or on a Ray cluster
    CLI and main              options, preflight, lock, recovery of dead runs, main()
"""

from __future__ import annotations

import argparse
import atexit
import collections
import collections.abc
import contextlib
import csv
import ctypes
import fcntl
import functools
import gc
import hashlib
import html
import importlib
import importlib.metadata
import io
import json
import math
import os
import platform
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import weakref
import zlib
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

# --------------------------------------------------------------------------------------
# Constants and logging
# --------------------------------------------------------------------------------------

NUM_INFERENCE_RUNS = 5           # Number of inference runs per image
RANDOM_SEED = 42                 # For reproducibility
CLEANUP_SLEEP_SEC = 2            # Sleep duration between models for GPU cleanup
TIMESTAMP_FORMAT = "%Y%m%d_%H%M%S"  # Folder/file naming format

SCRIPT_PATH = Path(__file__).resolve()
SCRIPT_DIR = SCRIPT_PATH.parent
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PNG_CHANNELS = 16                # channels drawn in a layer's PNG grid
PNG_GRID_COLUMNS = 4
NPY_CHANNELS = 8                 # channels kept in a layer's NPY array
MAX_LEADING_TOKENS = 8           # class + register tokens dropped before a token grid
OVERVIEW_TILE_PX = 64
VARIANCE_CANCELLATION = 1e-2    # var/mean^2 below this: the sum-of-squares variance is recomputed exactly
WRITER_BUDGET_BYTES = 4 * 1024**2   # layer clones waiting for or in the file writers (or one larger clone)
TOP_LAYERS = 10                  # the most expensive layers listed per model
DISSECT_MIN_FREE_MB = 256        # dissection stops cleanly below this much free disk
NETWORK_CHECK_TIMEOUT_SEC = 4.0
REDUCED_CONFIG_ENV = "VISION_BENCH_REDUCED_CONFIG"  # "1": small test configs (random weights only)
CACHE_ENV = "VISION_BENCH_CACHE"  # built random checkpoints and FLOP counts (default ~/.cache/vision-bench)
LOCK_FILE_NAME = ".vision-bench.lock"
HF_HOST, ASSETS_HOST = "huggingface.co", "github.com"

EXIT_OK, EXIT_MODEL_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_REGRESSION = 0, 1, 2, 3, 4
EXIT_HISTORY_UNUSABLE = 5        # --fail-on-regression, and the history could not be read or written
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour codes, never on the console


def log(message: str, level: str = "INFO") -> None:
    """Print one progress line in the spec's format: '[LEVEL] message', plain ASCII."""
    text = f"[{level}] {message}" if level else message
    print(text.encode("ascii", "replace").decode("ascii"), flush=True)


def banner(title: str) -> None:
    log("=" * 80, "")
    log(title, "")
    log("=" * 80, "")


class BenchError(Exception):
    """An error the user can act on; carries the process exit code."""

    exit_code = EXIT_MODEL_FAILED


class UsageError(BenchError):
    exit_code = EXIT_USAGE


class OutputError(BenchError):
    """Output folder not writable, disk full: exit 1 with the path and the error."""


class DiskGuardStop(OutputError):
    """Dissection stopped before the disk would fall under DISSECT_MIN_FREE_MB free."""


class LockedError(BenchError):
    exit_code = EXIT_LOCKED


class WeightFileError(BenchError):
    """A weight file exists but cannot be loaded (truncated, not a checkpoint)."""


class ModelUnavailable(BenchError):
    """A model's implementation or weights can't be had (the spec's DA-V2 skip)."""


class RunInterrupted(BaseException):
    """Raised from the SIGTERM handler; BaseException so model code can't swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------------------
# Utilities
# --------------------------------------------------------------------------------------


def format_bytes(num_bytes: float | None) -> str:
    """Human-readable size: '512 MB', '1.25 GB'."""
    if num_bytes is None:
        return "n/a"
    if abs(num_bytes) >= 1024**3:
        return f"{num_bytes / 1024**3:.2f} GB"
    return f"{num_bytes / 1024**2:.0f} MB"


def get_timestamp() -> str:
    return datetime.now().strftime(TIMESTAMP_FORMAT)


def sanitize_layer_name(name: str) -> str:
    """A module's qualified name as a safe file name (kept from the spec; files use indices)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "root"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def to_mb(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 1024**2


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Inf: such statistics are written as null."""
    return value if math.isfinite(value) else None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; cgroup-pinned cron jobs included)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fsync_folder(folder: Path) -> None:
    """Make a new file's name durable (its folder's entry), where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cache_folder() -> Path:
    """Where built random checkpoints and FLOP counts are kept: $VISION_BENCH_CACHE, else the
    user's cache folder (~/.cache/vision-bench)."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vision-bench"
    return Path(base)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file or nothing: temporary file in the same folder, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"could not write {path}: {e.strerror or e}") from e


def host_reachable(hosts: list[str], timeout_sec: float = NETWORK_CHECK_TIMEOUT_SEC) -> dict[str, bool]:
    """TCP-connect to each host on port 443 in parallel; a hung DNS look-up counts as no."""
    answers: dict[str, bool] = {}

    def probe(host: str) -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout_sec):
                answers[host] = True
        except OSError:
            answers[host] = False

    threads = [threading.Thread(target=probe, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_sec
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return {h: answers.get(h, False) for h in hosts}


def network_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False")


def flush_streams() -> None:
    """Python's buffered console output out to its file descriptors (a stream may be None or closed)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def quiet_fds(*fds: int):
    """The file descriptors (1: stdout, 2: stderr) to /dev/null for the span: what C++ code prints
    past Python's streams (Ray's client, a warning per refused attempt, on fd 2; the TorchScript
    exporter, its whole graph on a failure, on fd 1), where one line of ours says what matters.
    What Python printed in the span is quiet too; every descriptor is restored whatever happens."""
    flush_streams()
    saved: dict[int, int] = {}
    try:
        with open(os.devnull, "wb") as null:
            for fd in fds:
                saved[fd] = os.dup(fd)
                os.dup2(null.fileno(), fd)
        yield
    finally:
        flush_streams()
        with contextlib.ExitStack() as restore:  # each one restored and closed, even if another fails
            for fd, copy in saved.items():
                restore.callback(os.close, copy)
                restore.callback(os.dup2, copy, fd)


@contextlib.contextmanager
def termination_signals():
    """SIGTERM (a cron timeout) raises RunInterrupted so cleanup runs; restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise RunInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- images ----------------------------------------------------------------------------


def pil_open(path: Path) -> Image.Image:
    """Pillow's own Image.open: importing Ultralytics replaces it with one that tries to
    pip-install pi-heif when a file is not an image (a network call in the middle of a run)."""
    patches = sys.modules.get("ultralytics.utils.patches")
    return (getattr(patches, "_image_open", None) or Image.open)(path)


def decode_image(path: Path) -> Image.Image:
    """Decode every pixel (verify() misses truncation) and return an upright RGB image.

    Raises ValueError with the reason for files that are not usable images.
    """
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit: treat both as a bomb.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with pil_open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"over Pillow's decompression-bomb limit ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            reason = "empty file" if path.stat().st_size == 0 else str(e) or type(e).__name__
            raise ValueError(reason) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images as 8-bit RGB."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        wide = img.mode.startswith("I;16") or arr.max(initial=0) > 255
        arr = arr / 257.0 if wide else arr
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA", "LA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def find_images(folder: Path) -> list[Path]:
    try:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as e:
        raise UsageError(f"image folder {folder} cannot be listed ({e.strerror or e}): "
                         f"fix its permissions or pass --images DIR") from None


def discover_images(folder: Path | None) -> tuple[list[Path], str]:
    """Validated image paths and a note on where they came from.

    folder None means the default test_data/, which falls back to Ultralytics' sample
    photos when it holds no image. Raises UsageError when no valid image is left.
    """
    explicit = folder is not None
    folder = folder if explicit else SCRIPT_DIR / "test_data"
    candidates = find_images(folder)
    source = f"{folder}"
    if not candidates and not explicit:
        from ultralytics.utils import ASSETS  # the two photos that ship with Ultralytics

        log(f"No image in {folder}: using the sample photos that ship with Ultralytics ({ASSETS})", "WARNING")
        folder, source = Path(ASSETS), f"Ultralytics sample photos ({ASSETS})"
        candidates = find_images(folder)
    if not folder.is_dir():
        raise UsageError(f"image folder {folder} does not exist or is not a folder: pass --images DIR with .jpg, .jpeg or .png files")
    valid = []
    for path in candidates:
        try:
            decode_image(path)
            valid.append(path)
        except ValueError as e:
            log(f"Skipping invalid image {path}: {e}", "WARNING")
    if not valid:
        what = "holds no .jpg, .jpeg or .png file" if not candidates else "holds no valid image"
        raise UsageError(f"image folder {folder} {what}: add images or pass --images DIR")
    log(f"Found {len(valid)} valid test images in {folder}")
    return valid, source


# --------------------------------------------------------------------------------------
# CUDA and NVML: every call to the GPU runtime and to NVML, and the decisions around them
# --------------------------------------------------------------------------------------
# No other section calls torch.cuda or NVML: they ask the functions here. The decisions
# (which device index, which NVML device, which GPU processes are others, how many compile
# warm-up calls, where layers are timed) are pure functions, tested on the CPU.

CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that use CUDA graphs
CUDA_CONTEXT_SLACK_MB = 2048     # NVML's per-process memory = our allocator's reserved + context (< this)


def pick_cuda_device(request: str, available: bool, count: int, current: int) -> torch.device:
    """--device auto/cuda/cuda:N as an indexed device: 'cuda' is the current device (under Ray,
    the GPU the task was given, which CUDA_VISIBLE_DEVICES makes index 0). UsageError when absent."""
    if request == "cpu" or (request == "auto" and not available):
        return torch.device("cpu")
    if not available:
        raise UsageError(f"--device {request}: CUDA is not available on this machine "
                         f"(torch {torch.__version__}). Use --device cpu or --device auto")
    if request in ("auto", "cuda"):
        return torch.device("cuda", current)
    device = torch.device(request)
    if device.index >= count:
        raise UsageError(f"--device {request}: only {count} CUDA device(s) present (cuda:0..cuda:{count - 1})")
    return device


def ray_device_request(request: str) -> str:
    """--device as a Ray task carries it: each node resolves auto/cuda itself. cuda:N cannot be
    honoured there: Ray gives a task one GPU and makes it the only one the task sees."""
    if re.fullmatch(r"cuda:\d+", request):
        raise UsageError(f"--device {request} with --executor ray: Ray gives each task one GPU and sets "
                         f"CUDA_VISIBLE_DEVICES to it, so the task sees it as cuda:0 and cuda:N does not exist "
                         f"there. Use --device cuda (or auto) and let Ray choose the GPU")
    return request


def normalise_gpu_uuid(text: str) -> str:
    """torch writes a UUID bare, NVML with a 'GPU-' (or 'MIG-') prefix: compare them without it."""
    text = str(text).strip().lower()
    return text.split("-", 1)[1] if text.startswith(("gpu-", "mig-")) else text


def nvml_index_for(cuda_uuid: str, nvml_uuids: list[str]) -> int | None:
    """The NVML device index of a CUDA device, by UUID (NVML ignores CUDA_VISIBLE_DEVICES, so
    the CUDA index is not the NVML index under Ray or a restricted container); None if absent."""
    want = normalise_gpu_uuid(cuda_uuid)
    return next((i for i, u in enumerate(nvml_uuids) if normalise_gpu_uuid(u) == want), None)


def other_gpu_processes(procs: list[tuple[int, float | None]], own_pid: int,
                        own_reserved_mb: float | None) -> tuple[list[int], str]:
    """The other processes on our GPU, from NVML's (pid, used MB) list, and how ours was told apart.

    NVML reports host PIDs: in a container our PID is not among them. Then ours is the process
    whose memory matches our allocator's reserved memory plus a CUDA context; a lone process is ours.
    """
    pids = [pid for pid, _ in procs]
    if own_pid in pids:
        return sorted(p for p in pids if p != own_pid), "pid"
    if len(procs) <= 1:
        return [], "only process on the GPU" if procs else "no process listed"
    if own_reserved_mb is not None:
        fits = [(used - own_reserved_mb, pid) for pid, used in procs
                if used is not None and 0 <= used - own_reserved_mb <= CUDA_CONTEXT_SLACK_MB]
        if fits:
            own = min(fits)[1]
            return sorted(p for p in pids if p != own), "memory match (PID namespace differs)"
    return sorted(pids), "undecided: none matched our memory (all counted as others)"


def compile_warmup_calls(mode: str | None, device_type: str) -> int:
    """Compiled-forward calls per distinct input shape before the samples: one compiles; with CUDA
    graphs (reduce-overhead, max-autotune on CUDA) the first call runs eagerly and the second
    records, so the first replay is the third call."""
    if mode is None:
        return 0
    return 2 if mode in CUDA_GRAPH_COMPILE_MODES and device_type == "cuda" else 1


COMPILE_SETTLE_MAX_EXTRA_CALLS = 3  # calls beyond compile_warmup_calls while each still compiles graphs


def compile_settled(calls: int, min_calls: int, graphs_grew: bool) -> bool:
    """Whether a shape's compile warm-up is done: at least min_calls, and the last call compiled
    no new graph (a model that caches state on its first call, as YOLO's Detect head caches its
    anchors' shape, fails a guard and recompiles on the second), at most a few calls more."""
    return calls >= min_calls and (not graphs_grew or calls >= min_calls + COMPILE_SETTLE_MAX_EXTRA_CALLS)


PHASES_BEFORE_CUDA = ("import", "runtime init")  # runtime init synchronises at its own end


def phase_clock_device(phase: str, device: torch.device) -> torch.device:
    """The device a phase's clocks synchronise: none up to runtime init's start (a synchronise
    creates the CUDA context, which is runtime init's work: runtime_init_sec must include it)."""
    return torch.device("cpu") if phase in PHASES_BEFORE_CUDA else device


def layer_timing_pass(device_type: str) -> str:
    """Where the dissector times each layer: in the capture pass on the CPU (host clocks see the
    work as it happens), in a separate pass with no captures on CUDA (a capture synchronises, so
    events in the capture pass would time launches on an idle stream)."""
    return "separate pass" if device_type == "cuda" else "capture pass"


MEMORY_KINDS = {"process_rss": "rss_mb", "cuda_allocated": "cuda_allocated_mb", "gpu_process_nvml": "gpu_process_mb"}


def memory_kind(device_type: str, backend: str) -> str:
    """What a row's mem_* figures are: process RSS on the CPU; on CUDA the torch allocator's
    allocated memory for PyTorch, NVML's figure for the whole process for a runtime (the allocator
    does not see ONNX Runtime's or TensorRT's allocations)."""
    if device_type != "cuda":
        return "process_rss"
    return "cuda_allocated" if backend == "torch" else "gpu_process_nvml"


def nvml_memory_note(kind: str, nvml_status: str, peak_mb: float | None) -> str | None:
    """Why a row whose memory is NVML's figure has none: NVML is not there, or it could not tell
    our process apart; None when the figure is there or the row's memory is not NVML's."""
    if kind != "gpu_process_nvml" or peak_mb is not None:
        return None
    if nvml_status != "ok":
        return f"no GPU memory figure: NVML {nvml_status}"
    return ("no GPU memory figure: NVML lists this process under no PID of ours, beside other processes "
            "(a container's PID namespace): it cannot be told apart")


def own_gpu_process_mb(procs: list[tuple[int, float | None]], own_pid: int) -> float | None:
    """Our process's GPU memory in NVML's (pid, used MB) list: by PID, or the only process listed;
    None when neither tells it apart (not by a memory match: a runtime's memory is beyond what our
    allocator reserved, so a smaller process of someone else's would match) or NVML does not say."""
    others, _ = other_gpu_processes(procs, own_pid, None)
    own = [used for pid, used in procs if pid not in others]
    return own[0] if len(own) == 1 else None


def cuda_events_time(device_type: str, backend: str) -> bool:
    """Whether CUDA events on torch's stream time the forward: not a runtime's, which runs on
    streams of its own (its span is the host clock after a device-wide synchronise)."""
    return device_type == "cuda" and backend == "torch"


# -- calls ------------------------------------------------------------------------------


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_current_index() -> int:
    """The current CUDA device; 0 in a process that has not initialised CUDA (asking would)."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def resolve_cuda_request(request: str) -> torch.device:
    """pick_cuda_device with this machine's answers."""
    available = request != "cpu" and cuda_available()
    return pick_cuda_device(request, available, torch.cuda.device_count() if available else 0,
                            cuda_current_index() if available else 0)


def cuda_seed_all(seed: int) -> None:
    torch.cuda.manual_seed_all(seed)  # lazy: queued until CUDA initialises, no context now


def cuda_synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def cuda_runtime_init(device: torch.device) -> None:
    """Initialise CUDA and make device current: set_device needs an indexed device."""
    torch.cuda.init()
    torch.cuda.set_device(device.index)


def cuda_memory_mb(device: torch.device) -> tuple[float, float]:
    """The caching allocator's (allocated, reserved) MB on device."""
    return torch.cuda.memory_allocated(device) / 1024**2, torch.cuda.memory_reserved(device) / 1024**2


def cuda_reset_peak(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_allocated_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1024**2


def cuda_empty_cache() -> None:
    torch.cuda.empty_cache()


def cuda_event() -> Any:
    """A CUDA event recorded now on the current stream; .elapsed_time(later) is in milliseconds."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class CudaSpan:
    """Two CUDA events made ahead (creating one is a host call: not inside a timed span), recorded
    around a span of work; seconds() waits for the end event."""

    def __init__(self):
        self._begin, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._begin.record()  # torch creates the CUDA event at its first record: do that here
        self._end.record()

    def begin(self) -> None:
        self._begin.record()

    def end(self) -> None:
        self._end.record()

    def seconds(self) -> float:
        self._end.synchronize()
        return self._begin.elapsed_time(self._end) / 1000  # elapsed_time is in ms


def cuda_device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def cuda_capability(device: torch.device) -> str:
    """The device's compute capability as 'major.minor' (a TensorRT engine is built for one)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def cuda_tf32_flags() -> dict[str, bool | None]:
    """Whether fp32 convolutions (cuDNN) and matmuls (cuBLAS) may run on TF32 tensor cores; None
    when torch will not say. torch >= 2.9 keeps the setting in `fp32_precision` ('tf32', 'ieee', or
    'none': the legacy allow_tf32 flag decides), and reading allow_tf32 raises once the two APIs mix."""
    def allowed(backend: Any, legacy: Callable[[], bool]) -> bool | None:
        try:
            precision = getattr(backend, "fp32_precision", "none")
            return precision == "tf32" if precision in ("tf32", "ieee") else bool(legacy())
        except RuntimeError:
            return None

    return {"conv": allowed(getattr(torch.backends.cudnn, "conv", None), lambda: torch.backends.cudnn.allow_tf32),
            "matmul": allowed(torch.backends.cuda.matmul, lambda: torch.backends.cuda.matmul.allow_tf32)}


def cuda_cudnn_benchmark() -> bool:
    return bool(torch.backends.cudnn.benchmark)


def cuda_environment(device: torch.device) -> dict:
    """CUDA facts for the report: versions, the device's name and the device count."""
    available = cuda_available()
    index = device if device.type == "cuda" else torch.device("cuda", 0)
    return {"cuda_available": available, "cuda_version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version() if available else None,
            "gpu_name": cuda_device_name(index) if available else None,
            "gpu_count": torch.cuda.device_count() if available else 0}


class GpuMonitor:
    """NVIDIA GPU facts through NVML (nvidia-ml-py, optional): energy counter, SM clock, throttle
    reasons, other processes. The NVML device is found by the CUDA device's UUID. Every reading is
    None when NVML is not there; `status` says "ok" or "n/a: why"."""

    def __init__(self, device: torch.device, match_by_memory: bool = True):
        # match_by_memory: tell our process apart by the allocator's reserved memory where PIDs
        # differ; not for a runtime's row, whose process holds the runtime's memory beyond it.
        self.device, self.handle, self.status = device, None, "n/a: not a CUDA device"
        self.match_by_memory = match_by_memory
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid_text = str(torch.cuda.get_device_properties(device).uuid)
            uuids = [pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                     for i in range(pynvml.nvmlDeviceGetCount())]
            index = nvml_index_for(uuid_text, uuids)
            if index is None:
                self.status = f"n/a: NVML lists no device with the UUID of {device} ({uuid_text}; a MIG slice?)"
                return
            self.nvml, self.handle, self.status = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index), "ok"
        except Exception as e:  # not installed, no driver library, or no permission: "n/a"
            self.status = f"n/a: {type(e).__name__}: {e}"

    def _read(self, fn: str, *args) -> Any:
        if self.handle is None:
            return None
        try:
            return getattr(self.nvml, fn)(self.handle, *args)
        except Exception:
            return None

    def energy_mj(self) -> int | None:
        return self._read("nvmlDeviceGetTotalEnergyConsumption")

    def state(self) -> dict:
        """SM clock, throttle reasons (bit mask) and the other processes on the GPU, with how ours
        was told apart from them."""
        clocks = self._read("nvmlDeviceGetClockInfo", 1)  # NVML_CLOCK_SM
        reasons = self._read("nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is None:  # nvidia-ml-py before 12.535 (0 is a reading: no reasons)
            reasons = self._read("nvmlDeviceGetCurrentClocksThrottleReasons")
        procs = self._read("nvmlDeviceGetComputeRunningProcesses")
        others, how = None, None
        if procs is not None:
            listed = [(p.pid, None if p.usedGpuMemory is None else p.usedGpuMemory / 1024**2) for p in procs]
            reserved_mb = cuda_memory_mb(self.device)[1] if self.match_by_memory else None
            others, how = other_gpu_processes(listed, os.getpid(), reserved_mb)
        return {"sm_clock_mhz": clocks, "throttle_reasons": reasons, "other_gpu_pids": others, "own_process_by": how}

    def process_used_mb(self) -> float | None:
        """This process's GPU memory as NVML sees it (every allocator's, the CUDA context included)."""
        procs = self._read("nvmlDeviceGetComputeRunningProcesses")
        if procs is None:
            return None
        listed = [(p.pid, None if p.usedGpuMemory is None else p.usedGpuMemory / 1024**2) for p in procs]
        return own_gpu_process_mb(listed, os.getpid())

    def power_limit_w(self) -> float | None:
        limit = self._read("nvmlDeviceGetEnforcedPowerLimit")
        return limit / 1000 if limit is not None else None


# --------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------


def set_seed(seed: int = RANDOM_SEED) -> None:
    """Every random generator a model build or a run may draw from, seeded alike."""
    torch.manual_seed(seed)
    cuda_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        cuda_synchronize(device)


def clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def reset_rss_peak() -> bool:
    """Reset the kernel's high-water mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_host_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def get_memory_usage(device: torch.device, gpu: GpuMonitor | None = None) -> dict[str, float | None]:
    """One memory checkpoint: process RSS; on CUDA the allocator's allocated/reserved, and with a
    GPU monitor the process's GPU memory from NVML."""
    snap: dict[str, float | None] = {"rss_mb": to_mb(rss_bytes()), "cuda_allocated_mb": None,
                                     "cuda_reserved_mb": None, "gpu_process_mb": None}
    if device.type == "cuda":
        snap["cuda_allocated_mb"], snap["cuda_reserved_mb"] = cuda_memory_mb(device)
        snap["gpu_process_mb"] = gpu.process_used_mb() if gpu else None
    return snap


def headline_mb(snap: dict[str, float | None], kind: str) -> float | None:
    """The figure the spec's mem_* fields hold, of the row's memory_kind."""
    return snap[MEMORY_KINDS[kind]]


class PeakMemory:
    """Peak memory over one span: CUDA max_memory_allocated and the process VmHWM; for a runtime on
    CUDA, NVML's process figure at the span's end (NVML keeps no peak: a runtime's arena holds its
    peak, so the figure after the forward is its high-water mark)."""

    def __init__(self, device: torch.device, kind: str | None = None, gpu: GpuMonitor | None = None):
        self.device, self.gpu = device, gpu
        self.kind = kind or memory_kind(device.type, "torch")
        self.rss_peak_mb: float | None = None
        self.cuda_peak_mb: float | None = None
        self.gpu_process_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            cuda_reset_peak(self.device)
        self._hwm_reset = reset_rss_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.cuda_peak_mb = cuda_peak_allocated_mb(self.device)
            self.gpu_process_mb = self.gpu.process_used_mb() if self.gpu else None
        # Without a reset (non-Linux) VmHWM is the lifetime peak, still an upper bound.
        self.rss_peak_mb = to_mb(rss_peak_bytes() or rss_bytes())

    @property
    def headline_mb(self) -> float | None:
        return headline_mb({"rss_mb": self.rss_peak_mb, "cuda_allocated_mb": self.cuda_peak_mb,
                            "gpu_process_mb": self.gpu_process_mb}, self.kind)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text


def runtime_init(device: torch.device) -> None:
    """Warm the runtime with tiny ops that are not the model (CUDA context, cuBLAS and cuDNN
    handles, CPU thread pools), so none of that one-time work is charged to a model's cold start."""
    if device.type == "cuda":
        cuda_runtime_init(device)
    x = torch.randn(256, 256, device=device)
    (x @ x).sum()
    F.conv2d(torch.randn(1, 16, 64, 64, device=device), torch.randn(16, 16, 3, 3, device=device), padding=1)
    sync(device)


class ModuleCallCounter:
    """Counts every nn.Module call in this process while active (a global forward pre-hook):
    proves that no forward of the model ran before its cold run."""

    def __enter__(self) -> "ModuleCallCounter":
        self.count = 0
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args) -> None:
        self.count += 1

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def busy_cpu_sec(cpus: list[int]) -> float:
    """CPU seconds spent busy (not idle, not waiting for I/O) on the given CPUs since boot."""
    per_cpu = psutil.cpu_times(percpu=True)
    busy = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(per_cpu[i], f, 0.0) for i in cpus if i < len(per_cpu) for f in busy)


def own_cpu_sec() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


class HostActivity:
    """What else the machine did during a span: CPU time that other processes used on the
    cores this process may run on, and the 1-minute load average at its end."""

    def __enter__(self) -> "HostActivity":
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        self._start = (time.perf_counter(), busy_cpu_sec(self.cpus), own_cpu_sec())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        wall = max(time.perf_counter() - wall0, 1e-9)
        self.other_cpu_sec = max(0.0, (busy_cpu_sec(self.cpus) - busy0) - (own_cpu_sec() - own0))
        self.other_cpu_cores = self.other_cpu_sec / wall
        self.load_avg_1min = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------------------
# Deployment options and compute: precision, compile, fusion, threads; FLOPs, MFU, energy
# --------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# Dense peak TFLOP/s per precision, from the vendors' data sheets (no sparsity). A row matches
# when all its words are whole words of the CUDA device name (so "L4" never matches "L40"); the
# first match wins, so the more specific rows come first. "tf32": fp32 on tensor cores.
PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H200", "NVL"), {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (("H200",), {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    (("H100", "NVL"), {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (("H100", "PCIe"), {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    (("H100",), {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    (("A100",), {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (("L40S",), {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    (("L40",), {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0, "fp16": 181.0}),
    (("L4",), {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
]
ENERGY_WINDOW_SEC = 2.0          # NVML energy: warm runs for at least this long, and an idle window as long
ENERGY_SETTLE_SEC = 2.0          # ... the idle window comes first, this long after the last busy work


@dataclass
class RunOptions:
    """How the models are deployed (--dtype, --channels-last, --compile, --fuse, --threads, --backend)."""

    dtype: str = "fp32"
    channels_last: bool = False
    compile: str | None = None   # a torch.compile mode, or None for eager
    fuse: bool = False
    threads: int | None = None   # CPU intra-op threads; None: the CPUs this process may use
    backend: str = "torch"       # --backend: torch, or a runtime that runs the exported forward (Runtimes)

    def check(self, device: torch.device, error: type[Exception], backends: list[str] | None = None) -> None:
        if self.dtype == "fp16" and device.type != "cuda":
            raise error(f"--dtype fp16 autocasts on CUDA only, and the device is {device}: use --dtype bf16 "
                        f"on the CPU, or --device cuda")
        if problem := backend_problem(backends or [self.backend], device.type, self):
            raise error(problem)

    def key(self, cpus: int) -> dict:
        """The options that differ from the defaults: part of the history's configuration key, so
        runs from before these options existed stay comparable. --threads N with N the CPUs the
        run could use (cpus) is the default written out, and compares with runs that left it out."""
        key = {k: v for k, v in asdict(self).items() if v != getattr(RunOptions, k)}
        if key.get("threads") == cpus:
            del key["threads"]
        return key


def options_text(options: RunOptions, backends: list[str] | None = None) -> str:
    """The options as given; with backends (--backend LIST) in place of the one backend field."""
    fields = asdict(options)
    if backends is not None:
        fields["backend"] = ",".join(backends)
    return ", ".join(f"{k}={v}" for k, v in fields.items())


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process: more after the first call means recompilations."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def autocast_context(device: torch.device, dtype: str):
    """Autocast for the forward in fp16/bf16; nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def to_float32(value: Any) -> Any:
    """Half-precision tensors in a model's outputs back to float32, for postprocessing."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict: set its fields in place
        for key in list(value.keys()):
            value[key] = to_float32(value[key])
        return value
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):  # named tuples pass as they are
        return type(value)(to_float32(v) for v in value)
    return value


def to_channels_last(value: Any) -> Any:
    """4-D tensors among a model's inputs in channels-last memory format."""
    if isinstance(value, torch.Tensor):
        return value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value
    if isinstance(value, dict):
        return {k: to_channels_last(v) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=1)
def register_flop_formulas() -> None:
    """torch's FLOP counter has no formula for the CPU flash-attention kernel: give it one."""
    from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        with contextlib.suppress(RuntimeError):  # already registered by a newer torch
            # The same count as its CUDA siblings: two batched matrix products.
            register_flop_formula(op, get_raw=True)(
                lambda query, key, value, *a, out_val=None, **k: sdpa_flop_count(query.shape, key.shape, value.shape))


def count_flops(forward: Callable[[], Any], leaves: list[tuple[str, torch.nn.Module]]
                ) -> tuple[int, dict[tuple[str, int], int], dict[str, int]]:
    """FLOPs of one forward (FlopCounterMode, under no_grad: it counts nothing under inference_mode):
    in total, per leaf call (the counter read at each call's pre- and post-hook) and per flop_class."""
    from torch.utils.flop_counter import FlopCounterMode

    register_flop_formulas()
    counter = FlopCounterMode(display=False)
    per_call: dict[tuple[str, int], int] = {}
    started: dict[int, int] = {}
    calls: collections.Counter = collections.Counter()

    def pre(module, inputs):
        started[id(module)] = counter.get_total_flops()

    def post_for(name):
        def post(module, inputs, output):
            calls[name] += 1
            per_call[(name, calls[name])] = counter.get_total_flops() - started.pop(id(module))
        return post

    handles = [m.register_forward_pre_hook(pre) for _, m in leaves]
    handles += [m.register_forward_hook(post_for(n)) for n, m in leaves]
    try:
        with torch.no_grad(), counter:
            forward()
    finally:
        for handle in handles:
            handle.remove()
    by_class = {"conv": 0, "matmul": 0}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        by_class[flop_class(str(op))] += n
    return counter.get_total_flops(), per_call, by_class


def shapes_of(value: Any) -> Any:
    """The shapes and dtypes of a model input's tensors (nested as the input is), other values as they are."""
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype)]
    if isinstance(value, collections.abc.Mapping):
        return {str(k): shapes_of(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [shapes_of(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__qualname__


def flop_count_key(forward_name: str, model: torch.nn.Module, inputs: Any, options: RunOptions) -> str:
    """Everything one forward's FLOP count depends on: this program's text (the formulas and the
    forward), torch's version, every module's type, every parameter's and buffer's name and shape,
    the inputs' shapes, and the options that change the graph. Weights' values do not count."""
    structure = [[name, type(m).__module__, type(m).__qualname__] for name, m in model.named_modules()]
    tensors = [[name, list(t.shape)] for name, t in model.state_dict().items()]
    depends = json.dumps([forward_name, torch.__version__, structure, tensors, shapes_of(inputs),
                          options.dtype, options.fuse, options.channels_last])
    return hashlib.sha256(SCRIPT_PATH.read_bytes() + depends.encode()).hexdigest()


def flop_cache_path(forward_name: str, key: str) -> Path:
    return cache_folder() / f"flops-{forward_name}-{key[:20]}.json"


def read_flop_cache(path: Path, key: str) -> tuple[int, dict[tuple[str, int], int], dict[str, int]] | None:
    """A FLOP count kept by an earlier run of the same key; None when there is none or it is unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["key"] != key:
            return None
        per_call = {(name, int(call)): int(n) for name, call, n in record["per_call"]}
        return int(record["total"]), per_call, {k: int(v) for k, v in record["by_class"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_flop_cache(path: Path, key: str, total: int, per_call: dict[tuple[str, int], int],
                     by_class: dict[str, int]) -> None:
    """Keep a FLOP count for later runs; a cache that cannot be written only costs the next run a count."""
    record = {"key": key, "total": total, "by_class": by_class,
              "per_call": [[name, call, n] for (name, call), n in per_call.items()]}
    with contextlib.suppress(OSError, OutputError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record))


def flop_class(op_name: str) -> str:
    """The peak an op's FLOPs run against: cuDNN convolutions ("conv") or cuBLAS matrix products and
    attention ("matmul"): under fp32 they may differ (TF32 is allowed for one and not the other)."""
    return "conv" if "convolution" in op_name else "matmul"


def class_precisions(device_type: str, dtype: str, tf32: dict[str, bool | None]) -> dict[str, str | None]:
    """The precision each FLOP class runs in: fp16/bf16 under autocast; fp32 as tf32 on CUDA where
    the flag in force allows it (cuDNN's is on by default, cuBLAS's off); None where unknown."""
    if dtype != "fp32" or device_type != "cuda":
        return {"conv": dtype, "matmul": dtype}
    return {k: None if tf32.get(k) is None else "tf32" if tf32[k] else "fp32" for k in ("conv", "matmul")}


def device_name_words(device_name: str) -> set[str]:
    return {w.lower() for w in re.split(r"[\s\-_/]+", device_name) if w}


def peak_tflops_for(device_name: str | None, precision: str | None) -> float | None:
    """The device's dense data-sheet peak for a precision; None for the CPU, unknown devices and
    MIG slices (a slice has a fraction of the multiprocessors: no honest full-chip peak)."""
    if not device_name or precision is None:
        return None
    words = device_name_words(device_name)
    if "mig" in words:
        return None
    for row, peaks in PEAK_TFLOPS:
        if all(w.lower() in words for w in row):
            return peaks.get(precision)
    return None


def mix_peak_tflops(flops_by_class: dict[str, int], peaks: dict[str, float | None]) -> float | None:
    """The peak of a FLOP mix: total FLOPs over the time each class would take at its own peak."""
    total = sum(flops_by_class.values())
    if not total or any(peaks.get(k) is None for k, n in flops_by_class.items() if n):
        return None
    return total / sum(n / peaks[k] for k, n in flops_by_class.items() if n)


def compute_figures(flops: int | None, flops_by_class: dict[str, int], warm_median_sec: float | None,
                    device: torch.device, dtype: str, tf32: dict[str, bool | None] | None = None) -> dict:
    """GFLOPs per forward, achieved TFLOP/s at warm_median_sec (of the image the FLOPs were counted
    on), and MFU against the peak of the FLOP mix, each class at the precision it ran in (tf32: a
    runtime's own flags, runtime_tf32; else torch's)."""
    name = cuda_device_name(device) if device.type == "cuda" else None
    tf32 = tf32 if tf32 is not None else cuda_tf32_flags()
    precisions = class_precisions(device.type, dtype, tf32)
    peak = mix_peak_tflops(flops_by_class, {k: peak_tflops_for(name, p) for k, p in precisions.items()})
    used = {k: precisions[k] for k in ("conv", "matmul") if flops_by_class.get(k)}
    label = ", ".join(f"{k} {p}" for k, p in used.items()) if len(set(used.values())) > 1 else next(iter(used.values()), None)
    achieved = flops / warm_median_sec / 1e12 if flops and warm_median_sec else None
    return {"gflops": flops / 1e9 if flops is not None else None, "flops_by_class": flops_by_class,
            "achieved_tflops": achieved, "peak_tflops": peak, "tf32": tf32, "peak_precision": label if peak else None,
            "mfu": achieved / peak if achieved is not None and peak else None}


def energy_per_inference(monitor: GpuMonitor, run_once: Callable[[], None], device: torch.device,
                         sleep: Callable[[float], None] = time.sleep) -> dict:
    """Energy of warm runs over a window of at least ENERGY_WINDOW_SEC, minus an idle window of the
    same length measured first, after a settle: right after busy work the clocks and the counter lag,
    so an idle window there reads high. J per inference and mean W; None without NVML."""
    empty = {"energy_j_per_inference": None, "power_mean_w": None, "power_idle_w": None, "energy_runs": None}
    if monitor.energy_mj() is None:
        return empty
    sync(device)
    sleep(ENERGY_SETTLE_SEC)
    e0, t0 = monitor.energy_mj(), time.perf_counter()
    sleep(ENERGY_WINDOW_SEC)
    idle_sec, idle_j = time.perf_counter() - t0, (monitor.energy_mj() - e0) / 1000
    e1, t1, runs = monitor.energy_mj(), time.perf_counter(), 0
    while time.perf_counter() - t1 < ENERGY_WINDOW_SEC or runs == 0:
        run_once()
        runs += 1
    sync(device)
    busy_sec, busy_j = time.perf_counter() - t1, (monitor.energy_mj() - e1) / 1000
    idle_w = idle_j / idle_sec
    return {"energy_j_per_inference": max(busy_j - idle_w * busy_sec, 0.0) / runs, "power_mean_w": busy_j / busy_sec,
            "power_idle_w": idle_w, "energy_runs": runs}


# --------------------------------------------------------------------------------------
# Statistics (pure functions: no model, no device)
# --------------------------------------------------------------------------------------

PERCENTILE_MIN_SAMPLES = {50: 1, 90: 10, 99: 100}  # below these a percentile is a maximum in disguise
NOISE_MAX_IQR_REL = 0.10         # warm IQR / median above this: the figures are noisy
NOISE_MAX_OTHER_CORES = 0.5      # other processes using more than half a core: noisy
NOISE_MIN_IQR_SAMPLES = 4        # fewer warm samples give no meaningful IQR


def median_or_none(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def percentile_or_none(values: list[float], q: int) -> float | None:
    """The q-th percentile, or None when the samples cannot support it (PERCENTILE_MIN_SAMPLES)."""
    return float(np.percentile(values, q)) if len(values) >= PERCENTILE_MIN_SAMPLES[q] else None


def relative_warm_iqr(records: list[dict]) -> float | None:
    """IQR over median of the warm runs, each run taken relative to its own image's warm
    median, so images of different input shapes do not look like noise."""
    ratios = []
    for image in dict.fromkeys(r["image"] for r in records):
        warm = [r["inference_sec"] for r in records if r["image"] == image and r["run"] > 1]
        if warm:
            median = float(np.median(warm))
            ratios += [t / median for t in warm] if median > 0 else []
    if len(ratios) < NOISE_MIN_IQR_SAMPLES:
        return None
    q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
    return float((q3 - q1) / q2)


def image_stats(records: list[dict]) -> list[dict]:
    """Per image, in order: its cold run (run 1), its warm runs (2..N), shape, pre/post times."""
    rows = []
    for image in dict.fromkeys(r["image"] for r in records):
        mine = [r for r in records if r["image"] == image]
        warm = [r["inference_sec"] for r in mine if r["run"] > 1]
        rows.append({
            "image": image,
            "input_shape": mine[0].get("input_shape"),
            "runs": len(mine),
            "cold_sec": next(r["inference_sec"] for r in mine if r["run"] == 1),
            "warm_samples": len(warm),
            "warm_median_sec": percentile_or_none(warm, 50),
            "warm_min_sec": min(warm, default=None),
            "warm_max_sec": max(warm, default=None),
            "preprocess_avg_sec": float(np.mean([r["preprocess_sec"] for r in mine])),
            "postprocess_avg_sec": float(np.mean([r["postprocess_sec"] for r in mine])),
        })
    return rows


def latency_stats(records: list[dict]) -> dict:
    """Per model: the spec's avg/std/min/max/FPS over all runs; the cold start (first image,
    run 1); warm percentiles from warm runs only (runs 2..N of each image), each with its
    sample count, None where the samples cannot support it; per-image rows."""
    times = np.asarray([r["inference_sec"] for r in records], dtype=np.float64)
    warm = [r["inference_sec"] for r in records if r["run"] > 1]
    avg = float(times.mean())
    return {
        "avg_inference_sec": avg,
        "std_inference_sec": float(times.std()),
        "min_inference_sec": float(times.min()),
        "max_inference_sec": float(times.max()),
        "fps_avg": 1.0 / avg if avg > 0 else 0.0,
        "fps_std": float((1.0 / times).std()) if (times > 0).all() else None,
        "cold_inference_sec": float(times[0]),
        "warm_samples": len(warm),
        "warm_median_sec": percentile_or_none(warm, 50),
        "warm_p90_sec": percentile_or_none(warm, 90),
        "warm_p99_sec": percentile_or_none(warm, 99),
        "warm_iqr_rel": relative_warm_iqr(records),
        "preprocess_avg_sec": float(np.mean([r["preprocess_sec"] for r in records])),
        "postprocess_avg_sec": float(np.mean([r["postprocess_sec"] for r in records])),
        "per_image": image_stats(records),
    }


def noise_reasons(warm_iqr_rel: float | None, other_cpu_cores: float | None) -> list[str]:
    """Why a model's figures are not to be trusted as they stand (empty: quiet)."""
    reasons = []
    if warm_iqr_rel is not None and warm_iqr_rel > NOISE_MAX_IQR_REL:
        reasons.append(f"warm IQR/median {warm_iqr_rel:.0%} > {NOISE_MAX_IQR_REL:.0%}")
    if other_cpu_cores is not None and other_cpu_cores > NOISE_MAX_OTHER_CORES:
        reasons.append(f"other processes used {other_cpu_cores:.2f} cores > {NOISE_MAX_OTHER_CORES} during the runs")
    return reasons


ETA_HISTORY_RUNS = 3  # a model's expected wall time: the median of its last 3 runs in this configuration


def duration_text(seconds: float | None) -> str:
    """A duration for the console: <1s, 45s, 3m05s, 2h07m; '?' when unknown."""
    if seconds is None:
        return "?"
    whole = max(0, round(seconds))
    if whole == 0:
        return "<1s"
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def model_time_left(elapsed_sec: float, expected_sec: float | None, runs_done: int, runs_total: int,
                    run_sec_mean: float | None) -> float | None:
    """A model's time left: its expected wall time (its history) less the time spent, never under
    what its remaining runs take at the pace measured so far; without history, those runs alone."""
    pace_left = (runs_total - runs_done) * run_sec_mean if run_sec_mean is not None else None
    if expected_sec is not None:
        return max(expected_sec - elapsed_sec, pace_left or 0.0)
    return pace_left


def later_models_sec(expected: list[float | None], finished_walls: list[float]) -> float | None:
    """The time the models after this one will take: each its history's wall time, else the mean
    wall time of the models this run has finished; None when a model has neither."""
    fallback = float(np.mean(finished_walls)) if finished_walls else None
    total = 0.0
    for seconds in expected:
        if (seconds := seconds if seconds is not None else fallback) is None:
            return None
        total += seconds
    return total


def eta_source(model_from_history: bool, later_from_history: bool) -> str:
    """Where the console's estimate comes from: the history, this run's figures, or both."""
    if model_from_history:
        return "from the history" if later_from_history else "from the history and the models run so far"
    return "from the runs so far, later phases not counted"


def time_left_text(model_left_sec: float | None, after_sec: float | None, source: str) -> str:
    """The console's estimate: the model's time left and the whole run's, and where they come from."""
    run_left = model_left_sec + after_sec if model_left_sec is not None and after_sec is not None else None
    return f"left: model ~{duration_text(model_left_sec)}, run ~{duration_text(run_left)} ({source})"


# --------------------------------------------------------------------------------------
# Layer dissection
# --------------------------------------------------------------------------------------


def leaf_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules without children, each object once (a shared module is one leaf)."""
    return [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]


def first_tensor(output: Any) -> tuple[torch.Tensor | None, str]:
    """The first tensor in a hook's output (the spec) and the container kind it came in."""
    if isinstance(output, torch.Tensor):
        return output, "tensor"
    kind = type(output).__name__ if isinstance(output, dict) and type(output) is not dict else None
    if isinstance(output, dict):
        items = list(output.values())
        kind = kind or "dict"
    elif isinstance(output, (tuple, list)):
        items, kind = list(output), type(output).__name__
    else:
        return None, type(output).__name__
    for item in items:
        tensor, _ = first_tensor(item)
        if tensor is not None:
            return tensor, kind
    return None, kind


def as_feature_map(tensor: torch.Tensor, grids: list[tuple[int, int]]) -> tuple[torch.Tensor | None, dict | None]:
    """A (B, C, H, W) view of a layer output, or None when it has no spatial layout.

    Vision-transformer tokens (B, N, C) whose last h*w tokens form a known patch grid
    (after up to MAX_LEADING_TOKENS class/register tokens) become (B, C, h, w).
    """
    if tensor.dim() == 4:
        return tensor, None
    if tensor.dim() != 3:
        return None, None
    batch, tokens, channels = tensor.shape
    for h, w in grids:
        lead = tokens - h * w
        if h * w > 1 and 0 <= lead <= MAX_LEADING_TOKENS:
            fmap = tensor[:, lead:, :].transpose(1, 2).reshape(batch, channels, h, w)
            return fmap, {"tokens": tokens, "leading_tokens_dropped": lead, "grid": [h, w]}
    return None, None


GAP_INDEX = 255                  # palette entry of the gaps between channels and the caption strip
PNG_GAP_PX = 1
PNG_MIN_BODY_PX = 128           # maps (each channel) narrower are enlarged (nearest neighbour) to this width ...
PNG_MAX_SCALE = 8                # ... by at most this factor,
PNG_MIN_WIDTH_PX = 256           # on a canvas at least this wide, so the caption fits
CAPTION_LINE_PX = 11
# Stored (level 0) deflate: encoding is the file writers' main cost, and level 0 is about 3x faster
# than run-length deflate (which is 1.8x faster than level 1); a dissection's files grow 10-30%.
PNG_SAVE_OPTIONS = {"compress_level": 0}


@functools.lru_cache(maxsize=1)
def viridis_palette() -> list[int]:
    """A perceptual colour map as an 8-bit palette: entries 0..254 viridis, 255 white."""
    from matplotlib import colormaps

    colours = (colormaps["viridis"](np.linspace(0.0, 1.0, GAP_INDEX))[:, :3] * 255 + 0.5).astype(np.uint8)
    return colours.flatten().tolist() + [255, 255, 255]


def feature_grid(chw: np.ndarray, columns: int = PNG_GRID_COLUMNS, gap: int = PNG_GAP_PX) -> np.ndarray:
    """Up to 16 channels as one grid of palette indices (0..254), each channel min-max
    normalised on its own, a gap of GAP_INDEX between channels."""
    count = min(PNG_CHANNELS, chw.shape[0])
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    height, width = chw.shape[1:]
    grid = np.full((rows * (height + gap) - gap, cols * (width + gap) - gap), GAP_INDEX, dtype=np.uint8)
    lows = chw[:count].min(axis=(1, 2)).astype(np.float64)  # one pass each, all channels, no copy of
    highs = chw[:count].max(axis=(1, 2)).astype(np.float64)  # a strided (token) map
    for i in range(count):  # one channel at a time keeps temporaries small
        ch, lo, hi = chw[i], lows[i], highs[i]
        if not (math.isfinite(lo) and math.isfinite(hi)):  # rare: NaN/inf, so pay for a cleaned copy
            ch = np.nan_to_num(ch.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            lo, hi = float(ch.min()), float(ch.max())
        r, c = divmod(i, cols)
        y, x = r * (height + gap), c * (width + gap)
        if hi > lo:
            scaled = ch.astype(np.float32) - np.float32(lo)  # float32 even for half-precision captures
            scaled *= np.float32((GAP_INDEX - 1) / (hi - lo))
            scaled += np.float32(0.5)
            grid[y:y + height, x:x + width] = scaled  # truncation after +0.5 rounds
        else:
            grid[y:y + height, x:x + width] = 0
    return grid


def fit_text(text: str, width_px: int, char_px: int = 6) -> str:
    """Text cut from the left ('...tail') to fit width_px in Pillow's default font."""
    room = max(4, width_px // char_px)
    return text if len(text) <= room else "..." + text[-(room - 3):]


@functools.lru_cache(maxsize=1)
def caption_font() -> ImageFont.ImageFont:
    """Pillow's built-in bitmap font (6x11 px): about 20x faster to draw than its FreeType default."""
    return ImageFont.load_default_imagefont()


def palette_image(indices: np.ndarray, caption: list[str], map_width_px: int | None = None) -> Image.Image:
    """Palette indices as a viridis PNG image, enlarged when one map (a channel of the grid,
    map_width_px wide; default the whole image) is small, with a caption strip above; the
    canvas is widened (not the map enlarged further) where the caption needs room."""
    scale = min(PNG_MAX_SCALE, max(1, math.ceil(PNG_MIN_BODY_PX / (map_width_px or indices.shape[1]))))
    body = indices.repeat(scale, 0).repeat(scale, 1) if scale > 1 else indices
    top = CAPTION_LINE_PX * len(caption) + 2
    width = max(body.shape[1], PNG_MIN_WIDTH_PX)
    img = Image.new("P", (width, top + body.shape[0]), GAP_INDEX)
    img.putpalette(viridis_palette())
    img.paste(Image.fromarray(body, "P"), (0, top))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(caption):
        draw.text((2, 1 + i * CAPTION_LINE_PX), fit_text(line, width - 4), fill=0, font=caption_font())
    return img


def save_feature_map_png(tensor: torch.Tensor | np.ndarray, path: Path, caption: list[str] | None = None) -> int:
    """Save the first 16 channels of batch item 0 as a captioned viridis PNG grid; returns bytes written."""
    if isinstance(tensor, torch.Tensor):
        tensor = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    palette_image(feature_grid(tensor[0]), caption or [], tensor.shape[-1]).save(path, **PNG_SAVE_OPTIONS)
    return path.stat().st_size


def save_feature_map_npy(tensor: torch.Tensor | np.ndarray, path: Path) -> int:
    """Save the first 8 channels (all batch items) as NPY; returns bytes written."""
    if isinstance(tensor, torch.Tensor):
        tensor = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    np.save(path, np.ascontiguousarray(tensor[:, :NPY_CHANNELS]))
    return path.stat().st_size


def lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux nice is per thread), so it uses
    cores the forward pass leaves idle instead of slowing the forward down."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class FileWriter:
    """Writes layer files on a pool of background threads, one per usable CPU but the forward
    thread's, at the lowest CPU priority, so encoding fills the cores the forward leaves idle.

    Memory stays bounded: the clones waiting or being written total at most
    WRITER_BUDGET_BYTES, or a single clone when one alone is larger. A capture reserves its
    bytes before it makes its clone; a writer gives them back once it has dropped the clone.
    A capture larger than the budget can instead be written by the calling thread (run_here).
    """

    def __init__(self, threads: int | None = None, budget_bytes: int = WRITER_BUDGET_BYTES):
        self._queue: queue.Queue = queue.Queue()
        self._room = threading.Condition()
        self.budget_bytes, self._in_flight = budget_bytes, 0
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.seconds = 0.0  # CPU time, summed over the writer threads
        self._threads = [threading.Thread(target=self._work, name=f"vision-bench-writer-{i}", daemon=True)
                         for i in range(threads or max(1, usable_cpus() - 1))]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        lower_thread_priority()
        while (item := self._queue.get()) is not None:
            self._run(*item)

    def _run(self, job: Callable[[], int], nbytes: int) -> None:
        start = time.thread_time()  # CPU time: a low-priority thread's wall time includes waiting
        try:
            written = job() if self.error is None else 0
        except BaseException as e:  # reported to the forward thread on its next reserve
            written, self.error = 0, e
        with self._lock:
            self.bytes_written += written
            self.seconds += time.thread_time() - start
        del job  # the clone goes before its bytes are given back
        with self._room:
            self._in_flight -= nbytes
            self._room.notify_all()

    def reserve(self, nbytes: int) -> None:
        """Wait until nbytes more fit the budget; call before making the clone the job will write."""
        self.raise_error()
        with self._room:
            self._room.wait_for(lambda: self._in_flight == 0 or self._in_flight + nbytes <= self.budget_bytes)
            self._in_flight += nbytes

    def submit(self, job: Callable[[], int], nbytes: int) -> None:
        self._queue.put((job, nbytes))

    def run_here(self, job: Callable[[], int]) -> None:
        """Write in the calling thread (no copy to keep alive), counted like the pool's jobs."""
        self.raise_error()
        self._run(job, 0)
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise OutputError(f"writing layer files failed: {self.error}") from self.error

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


@dataclass
class LayerRecord:
    index: int
    name: str
    type: str
    call: int
    container: str
    shape: list[int] | None = None
    dtype: str | None = None
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    sparsity: float | None = None
    reshaped_from_tokens: dict | None = None
    files: list[str] = field(default_factory=list)
    note: str | None = None
    forward_ms: float | None = None  # this call's own time, from its pre- and post-hook


def tensor_statistics(tensor: torch.Tensor) -> tuple[float | None, ...]:
    """min, max, mean, std (unbiased) and the fraction of zeros, in four fast passes.

    The variance comes from the sum and the sum of squares (torch's std is about 5x slower on
    the CPU); where that formula would lose digits (std tiny against the mean) torch's exact
    std is used instead. Non-finite results are None.
    """
    t = tensor.detach()
    t = t if t.dtype in (torch.float32, torch.float64) else t.float()
    n = t.numel()
    lo, hi = torch.aminmax(t)
    zeros = 1.0 - torch.count_nonzero(t) / n
    lo, hi, total, norm, zeros = torch.stack([lo, hi, t.sum(), torch.linalg.vector_norm(t), zeros.to(t.dtype)]).tolist()
    mean = total / n
    var = (norm * norm - total * mean) / (n - 1) if n > 1 else 0.0
    if n > 1 and math.isfinite(var) and var < VARIANCE_CANCELLATION * mean * mean:  # digits cancel
        var = t.var().item()
    std = math.sqrt(max(var, 0.0)) if math.isfinite(var) else float("nan")
    return tuple(finite_or_none(v) for v in (lo, hi, mean, std, zeros))


class LayerTimer:
    """Each leaf call's own forward time, from its pre-hook to its post-hook: CUDA events on a
    GPU (read once, after the forward; in a pass of their own, see layer_timing_pass),
    perf_counter on the CPU. Approximate: the hooks add a little, and file writers on other
    threads may take some of the cores (they run at the lowest priority so they mostly use idle ones)."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.times_ms: dict[tuple[str, int], float] = {}  # (module name, call) -> ms
        self._open: dict[int, Any] = {}
        self._pending: list[tuple[tuple[str, int], Any, Any]] = []

    def _now(self) -> Any:
        return cuda_event() if self.cuda else time.perf_counter()

    def pre_hook(self, module, inputs) -> None:
        self._open[id(module)] = self._now()

    def stop(self, module: torch.nn.Module, key: tuple[str, int]) -> None:
        """End the call of module that began at its pre-hook; call first thing in the post-hook."""
        end, begin = self._now(), self._open.pop(id(module))
        if self.cuda:
            self._pending.append((key, begin, end))
        else:
            self.times_ms[key] = (end - begin) * 1000

    def finish(self) -> dict[tuple[str, int], float]:
        if self._pending:
            cuda_synchronize(self.device)
        for key, begin, end in self._pending:
            self.times_ms[key] = begin.elapsed_time(end)
        self._pending.clear()
        return self.times_ms


@dataclass
class DissectLimits:
    """Which outputs get files: --dissect-filter (module name or type) and --dissect-max-mb.
    Every output gets its metadata either way."""

    pattern: str | None = None
    max_mb: float | None = None

    def __post_init__(self):
        self._regex = re.compile(self.pattern) if self.pattern else None

    def matches(self, record: "LayerRecord") -> bool:
        return self._regex is None or bool(self._regex.search(record.name) or self._regex.search(record.type))


class LayerDissector:
    """Captures the output of every call of every leaf module of a model.

    single-pass: hooks on all leaves, one forward. per-layer: the spec's algorithm, one
    forward per leaf module (after a tracing forward that fixes the execution order, so
    both modes number and write identical files).
    """

    MODES = ("single-pass", "per-layer")

    def __init__(self, model: torch.nn.Module, out_dir: Path, token_grids: list[tuple[int, int]], verbose: bool = True,
                 limits: DissectLimits | None = None, timing: str | None = None):
        self.leaves = leaf_modules(model)
        self.limits = limits or DissectLimits()
        self.pictures_stopped: dict | None = None  # where --dissect-max-mb stopped the files, and why
        self.out_dir = out_dir
        self.token_grids = token_grids
        self.verbose = verbose
        self.records: list[LayerRecord] = []
        self.tiles: dict[int, np.ndarray] = {}
        self.stats_sec = 0.0
        self.forward_sec = 0.0
        self._pad = max(3, len(str(len(self.leaves))))
        self._writer: FileWriter | None = None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.timing = timing or layer_timing_pass(device.type)
        self._timer = LayerTimer(device)

    # -- capture --------------------------------------------------------------------

    def _hook_for(self, name: str, index_of: Callable[[str, int], int]):
        calls = 0

        def hook(module, inputs, output):
            nonlocal calls
            calls += 1
            if self.timing == "capture pass":
                self._timer.stop(module, (name, calls))  # before the capture's own work
            self._capture(index_of(name, calls), name, module, calls, output)

        return hook

    def _capture(self, index: int, name: str, module: torch.nn.Module, call: int, output: Any) -> None:
        start = time.perf_counter()
        tensor, container = first_tensor(output)
        record = LayerRecord(index=index, name=name, type=type(module).__name__, call=call, container=container)
        self.records.append(record)
        if tensor is None:
            record.note = "no tensor in output"
            return
        record.shape, record.dtype = list(tensor.shape), str(tensor.dtype).replace("torch.", "")
        if tensor.numel() == 0 or not tensor.is_floating_point():
            record.note = "metadata only (empty or non-float tensor)"
            return
        self._statistics(record, tensor)
        fmap, reshaped = as_feature_map(tensor.detach(), self.token_grids)
        record.reshaped_from_tokens = reshaped
        if fmap is not None and fmap.shape[1] > 0 and self._wants_files(record):
            self._picture(record, fmap)
        if self.verbose:
            log(f"Layer {index:0{self._pad}d} {name} (call {call}): {tuple(tensor.shape)}", "DISSECT")
        self.stats_sec += time.perf_counter() - start

    def _wants_files(self, record: LayerRecord) -> bool:
        if not self.limits.matches(record):
            record.note = "no files: not matched by --dissect-filter"
            return False
        budget = None if self.limits.max_mb is None else self.limits.max_mb * 1024**2
        if budget is not None and self._writer.bytes_written >= budget:  # lags by the clones in flight
            if self.pictures_stopped is None:
                self.pictures_stopped = {"index": record.index, "bytes_written": self._writer.bytes_written,
                                         "reason": f"--dissect-max-mb {self.limits.max_mb:g} reached"}
                log(f"Layer files stop at layer {record.index}: --dissect-max-mb {self.limits.max_mb:g} reached "
                    f"({format_bytes(self._writer.bytes_written)} written); metadata continues", "DISSECT")
            record.note = "no files: --dissect-max-mb budget reached"
            return False
        return True

    def _statistics(self, record: LayerRecord, tensor: torch.Tensor) -> None:
        record.min, record.max, record.mean, record.std, record.sparsity = tensor_statistics(tensor)

    def _picture(self, record: LayerRecord, fmap: torch.Tensor) -> None:
        """Queue the PNG/NPY of a (B, C, H, W) map and keep its channel-mean overview tile."""
        part = fmap[:, :PNG_CHANNELS]
        self._check_disk(part.numel() * 5)  # raw PNG + float32 NPY: an upper bound
        nbytes = part.numel() * part.element_size()
        # A map larger than the writers' budget would wait for them to drain anyway: a CPU one is
        # written here, from the live tensor, with no copy (it cannot change during the hook).
        here = nbytes > self._writer.budget_bytes and part.device.type == "cpu"
        if not here:
            self._writer.reserve(nbytes)
        clone = part.detach() if here else part.to("cpu", copy=True).contiguous()  # a copy outlives the hook
        tile = fmap[0].float().mean(0, keepdim=True)[None]
        size = (min(OVERVIEW_TILE_PX, tile.shape[-2]), min(OVERVIEW_TILE_PX, tile.shape[-1]))
        self.tiles[record.index] = F.adaptive_avg_pool2d(tile, size)[0, 0].cpu().numpy()
        stem = f"layer_{record.index:0{self._pad}d}"
        record.files = [f"{stem}.png", f"{stem}.npy"]
        png, npy = self.out_dir / record.files[0], self.out_dir / record.files[1]
        caption = [f"#{record.index} {record.name} (call {record.call})",
                   f"{record.type} {'x'.join(map(str, record.shape))} [{fmt(record.min, '.3g')}, {fmt(record.max, '.3g')}]"]
        job = lambda: save_feature_map_png(clone, png, caption) + save_feature_map_npy(clone, npy)  # noqa: E731
        self._writer.run_here(job) if here else self._writer.submit(job, nbytes)

    def _check_disk(self, need_bytes: int) -> None:
        free = shutil.disk_usage(self.out_dir).free
        need = need_bytes
        if free - need < DISSECT_MIN_FREE_MB * 1024**2:
            raise DiskGuardStop(
                f"only {format_bytes(free)} free in {self.out_dir}; dissection stops before the disk "
                f"falls under {DISSECT_MIN_FREE_MB} MB. Free space or pass --no-dissect"
            )

    # -- modes ----------------------------------------------------------------------

    def run(self, forward: Callable[[], Any], mode: str = "single-pass") -> dict:
        """Dissect with one of MODES; hooks are removed and the writer drained even on error.

        When the disk guard stops it, what was captured so far is kept and the summary says why.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self._writer = FileWriter()
        stopped = None
        try:
            self._check_disk(0)
            if mode == "per-layer":
                self._run_per_layer(forward)
            else:
                self._run_hooked(forward, self.leaves, lambda name, call: self._next_index())
            if self.timing == "separate pass":
                self._run_timing_pass(forward)
        except DiskGuardStop as e:
            stopped = str(e)
        finally:
            self._writer.close()
        times = self._timer.finish()
        for record in self.records:
            record.forward_ms = times.get((record.name, record.call))
        self._writer.raise_error()
        self.records.sort(key=lambda r: r.index)
        self._fix_padding()
        overview = self._write_overview()
        return {**self._summary(mode, time.perf_counter() - start, overview), "stopped": stopped}

    def _next_index(self) -> int:
        return len(self.records) + 1

    def _run_hooked(self, forward: Callable[[], Any], modules, index_of) -> None:
        timed = self.timing == "capture pass"
        handles = [m.register_forward_pre_hook(self._timer.pre_hook) for _, m in modules] if timed else []
        handles += [m.register_forward_hook(self._hook_for(n, index_of)) for n, m in modules]
        self._forward_with(forward, handles)

    def _forward_with(self, forward: Callable[[], Any], handles: list) -> None:
        """One forward under inference_mode (its time in forward_sec); the hooks removed after it."""
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                forward()
            self.forward_sec += time.perf_counter() - start
        finally:
            for handle in handles:
                handle.remove()

    def _run_timing_pass(self, forward: Callable[[], Any]) -> None:
        """One more forward with timing hooks only: no capture synchronises, so each layer's events
        bracket its kernels as they run."""
        calls: collections.Counter = collections.Counter()

        def stop_for(name: str):
            def stop(module, inputs, output):
                calls[name] += 1
                self._timer.stop(module, (name, calls[name]))
            return stop

        handles = [m.register_forward_pre_hook(self._timer.pre_hook) for _, m in self.leaves]
        handles += [m.register_forward_hook(stop_for(n)) for n, m in self.leaves]
        self._forward_with(forward, handles)

    def _run_per_layer(self, forward: Callable[[], Any]) -> None:
        order = trace_call_order(self.leaves, forward)
        index = {key: i for i, key in enumerate(order, 1)}
        for name, module in self.leaves:
            if any(key[0] == name for key in order):
                self._run_hooked(forward, [(name, module)], lambda n, call: index[(n, call)])

    # -- results --------------------------------------------------------------------

    def _fix_padding(self) -> None:
        """Names were padded to the leaf count; pad to the output count when it is wider."""
        pad = max(3, len(str(len(self.records))))
        if pad == self._pad:
            return
        for record in self.records:
            renamed = [re.sub(r"^layer_(\d+)", lambda m: f"layer_{int(m.group(1)):0{pad}d}", f) for f in record.files]
            for old, new in zip(record.files, renamed):
                os.replace(self.out_dir / old, self.out_dir / new)
            record.files = renamed
        self._pad = pad

    def _write_overview(self) -> str | None:
        """One small channel-mean tile per pictured layer, in execution order, labelled."""
        if not self.tiles:
            return None
        cell, label = OVERVIEW_TILE_PX + 4, 2 * CAPTION_LINE_PX
        cols = max(1, math.ceil(math.sqrt(len(self.tiles))))
        rows = math.ceil(len(self.tiles) / cols)
        sheet = Image.new("P", (cols * cell, rows * (cell + label)), GAP_INDEX)
        sheet.putpalette(viridis_palette())
        draw = ImageDraw.Draw(sheet)
        names = {r.index: r.name for r in self.records}
        for pos, (index, tile) in enumerate(sorted(self.tiles.items())):
            r, c = divmod(pos, cols)
            x, y = c * cell + 2, r * (cell + label)
            sheet.paste(Image.fromarray(feature_grid(tile[None]), "P"), (x, y + label))
            draw.text((x, y), str(index), fill=0, font=caption_font())
            draw.text((x, y + CAPTION_LINE_PX), fit_text(names[index], cell - 2), fill=0, font=caption_font())
        sheet.save(self.out_dir / "overview.png", compress_level=1)
        return "overview.png"

    def _summary(self, mode: str, seconds: float, overview: str | None) -> dict:
        files = [f for r in self.records for f in r.files] + ([overview] if overview else [])
        ran = {r.name for r in self.records}
        return {
            "dissect_mode": mode,
            "total_leaf_modules": len(self.leaves),
            "total_outputs": len(self.records),
            "total_files": len(files),
            "bytes_written": self._writer.bytes_written + ((self.out_dir / overview).stat().st_size if overview else 0),
            "seconds": seconds,
            "seconds_forward": self.forward_sec,
            "seconds_statistics": self.stats_sec,
            "seconds_file_writing": self._writer.seconds if self._writer else 0.0,
            "overview": overview,
            "modules_never_run": [n for n, _ in self.leaves if n not in ran],
            "layers_forward_ms_total": sum(r.forward_ms or 0.0 for r in self.records),
            "layer_timing": self.timing,
            "filter": self.limits.pattern,
            "max_mb": self.limits.max_mb,
            "pictures_stopped": self.pictures_stopped,
            "top_layers": [{"index": r.index, "name": r.name, "type": r.type, "forward_ms": r.forward_ms}
                           for r in sorted(self.records, key=lambda r: -(r.forward_ms or 0.0))[:TOP_LAYERS]],
            "layers": [vars(r) for r in self.records],
        }


def trace_call_order(leaves, forward: Callable[[], Any]) -> list[tuple[str, int]]:
    """Run one forward with counting hooks: the (module name, call number) execution order."""
    order: list[tuple[str, int]] = []
    counts: dict[str, int] = {}

    def make(name: str):
        def hook(module, inputs, output):
            counts[name] = counts.get(name, 0) + 1
            order.append((name, counts[name]))

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in leaves]
    try:
        with torch.inference_mode():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return order


# --------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------


@dataclass
class Requirement:
    """One thing a model needs before it can run: a module, a weight file or a hub model."""

    kind: str          # "module" | "file" | "hub"
    name: str          # module name, file path or hub id
    present: bool
    host: str | None = None  # where it downloads from when missing
    fix: str = ""


class ModelBenchmark(ABC):
    """Everything shared: loading, timing with CUDA sync, memory, hooks, saving, cleanup.

    A subclass says which model (class attributes, _load_pretrained/_build_random) and how
    to feed it (preprocess/forward/postprocess).
    """

    MODEL_NAME = ""          # display name
    SHORT_NAME = ""          # --models name
    INPUT_SIZE = 0           # native input size the model is fed
    LIBRARY = ""             # distribution providing the implementation
    PREPROCESS_NOTE = ""     # what preprocessing does (shown in the report)
    TOKEN_GRID_STRIDES: tuple[int, ...] = ()  # input pixels per token, for ViT token pictures
    REDUCED_CONFIG_SUPPORTED = False
    IMPORTS: tuple[str, ...] = ()  # modules imported before the baseline, so no model pays for them
    # True where the library's builder runs a forward (Ultralytics YOLO): random weights are
    # then built in a short-lived process (write_random_checkpoint) and loaded like a checkpoint
    # (_load_checkpoint), so the benchmarked process runs no forward before its cold run.
    RANDOM_BUILD_RUNS_FORWARD = False
    PARITY_TASK = ""  # what task_result() returns: detect, segment, pose, depth or mask (task_parity)
    DYNAMIC_INPUT_HW = False  # True where the input's height and width follow the image (an export's dynamic axes)

    def __init__(self, device: torch.device, weights: str = "pretrained", models_dir: Path | None = None,
                 random_checkpoint: Path | None = None, options: RunOptions | None = None):
        self.device = device
        self.options = options or RunOptions()
        self._compiled: Callable[[Any], Any] | None = None
        self.runtime: RuntimeForward | None = None  # --backend other than torch: what run_forward runs
        self.mem_kind = memory_kind(device.type, self.options.backend)
        self.gpu: GpuMonitor | None = None  # set once the runtime is up: NVML's process memory for runtime rows
        self.weights = weights
        self.models_dir = Path(models_dir) if models_dir else SCRIPT_DIR / "models"
        self.random_checkpoint = random_checkpoint
        self.model: torch.nn.Module | None = None
        self.processor: Any = None
        self.weight_source = "random (seeded)" if weights == "random" else self.pretrained_source()
        self.input_shape: list[int] | None = None
        self.notes: list[str] = []
        self.checkpoint_dtype: str | None = None  # the weights' stored dtype, where the loader can tell

    # -- what a subclass provides ---------------------------------------------------

    @abstractmethod
    def requirements(self) -> list[Requirement]:
        """Modules and weights needed for the current weights mode (preflight)."""

    @abstractmethod
    def pretrained_source(self) -> str:
        """Where the pretrained weights come from: a file path or a hub id."""

    @abstractmethod
    def _load_pretrained(self) -> torch.nn.Module:
        """Load the pretrained model from local files (download() ran first); set self.processor."""

    @abstractmethod
    def _build_random(self) -> torch.nn.Module:
        """Build the exact architecture with seeded random weights, no network or files."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> Any:
        """Image -> model inputs on self.device."""

    @abstractmethod
    def forward(self, inputs: Any) -> Any:
        """The model's forward pass (what the latency figures time)."""

    def postprocess(self, outputs: Any, image: Image.Image) -> Any:
        """Outputs -> task result at the image's size (timed separately)."""
        return outputs

    def task_result(self, result: Any, image: Image.Image) -> dict:
        """postprocess()'s result as numpy arrays for task_parity (see PARITY_TASK)."""
        raise NotImplementedError(f"{type(self).__name__} has no task result for parity")

    def fuse(self) -> str | None:
        """--fuse: fuse Conv+BN as the library's own inference does; returns a note when it does not apply."""
        return f"--fuse: {type(self).__name__} has no Conv+BN pairs to fuse (runs as loaded)"

    # -- shared ---------------------------------------------------------------------

    @property
    def reduced(self) -> bool:
        return self.REDUCED_CONFIG_SUPPORTED and self.weights == "random" and os.environ.get(REDUCED_CONFIG_ENV) == "1"

    def import_library(self) -> None:
        """Import what load and the runs need (timed apart from loading)."""
        for name in (self.LIBRARY, *self.IMPORTS):
            importlib.import_module(name)

    def download(self) -> bool:
        """Fetch missing pretrained weights (timed apart from loading); True when it downloaded."""
        return False

    def load(self) -> None:
        """Build the model from local files only, move it to the device, eval mode."""
        set_seed()
        if self.weights == "pretrained":
            model = self._load_pretrained()
        elif self.random_checkpoint is not None:
            model = self._load_checkpoint(self.random_checkpoint)
        else:
            model = self._build_random()
        # Inference only; FLOP counting's module tracker also trips over outputs that need grad.
        self.model = model.to(self.device).eval().requires_grad_(False)
        if self.reduced:
            self.notes.append(f"reduced configuration ({REDUCED_CONFIG_ENV}=1): not the full-size architecture")
        if self.options.fuse and (note := self.fuse()):
            self.notes.append(note)
        if self.options.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def prepare(self, image: Image.Image) -> Any:
        """preprocess(), then the inputs in channels-last format when asked."""
        inputs = self.preprocess(image)
        return to_channels_last(inputs) if self.options.channels_last else inputs

    def feed(self, image: Image.Image) -> Any:
        """prepare(), then the arrays the runtime reads when one runs the forward (run_forward's input)."""
        inputs = self.prepare(image)
        return self.runtime.feed(inputs) if self.runtime else inputs

    def model_outputs(self, outputs: Any) -> Any:
        """run_forward's result as postprocess() reads it: a runtime's arrays as tensors, float32."""
        return self.runtime.unpack(outputs) if self.runtime else to_float32(outputs)

    def fed_shape(self, inputs: Any) -> list[int]:
        """The first input's shape, from feed()'s result."""
        return self.runtime.fed_shape(inputs) if self.runtime else list(first_tensor(inputs)[0].shape)

    def run_forward(self, inputs: Any, eager: bool = False) -> Any:
        """The forward as deployed: the runtime's on feed()'s arrays with --backend, else autocast
        to --dtype and the compiled forward after compile() (eager=True: the plain module on
        prepare()'s inputs, for hooks: dissection and FLOP counting)."""
        if self.runtime and not eager:
            return self.runtime.run(inputs)
        with autocast_context(self.device, self.options.dtype):
            return (self._compiled if self._compiled and not eager else self.forward)(inputs)

    def compile(self, images: list[Image.Image]) -> dict:
        """--compile: torch.compile the forward and call it on each distinct input shape until it
        runs as it will in the samples (compile_warmup_calls: with CUDA graphs, until it replays;
        then until a call compiles nothing new, compile_settled)."""
        import torch._dynamo

        torch._dynamo.reset()
        self._compiled = torch.compile(self.forward, mode=None if self.options.compile == "default" else self.options.compile)
        per_shape = compile_warmup_calls(self.options.compile, self.device.type)
        shapes: dict[tuple[int, ...], Any] = {}  # one prepared input per distinct shape, outside the timer
        for image in images:
            inputs = self.prepare(image)
            shapes.setdefault(tuple(first_tensor(inputs)[0].shape), inputs)
        start, calls = clock(self.device), 0
        for inputs in shapes.values():
            shape_calls, grew = 0, True
            while not compile_settled(shape_calls, per_shape, grew):
                before = compiled_graph_count()
                with torch.inference_mode():
                    self.run_forward(inputs)
                shape_calls, grew = shape_calls + 1, compiled_graph_count() > before
            calls += shape_calls
        compile_sec = clock(self.device) - start
        self._graphs_after_compile = compiled_graph_count()
        return {"compile_sec": compile_sec, "compiled_graphs": self._graphs_after_compile,
                "compile_calls": calls, "compile_shapes": len(shapes)}

    def recompilations(self) -> int | None:
        return compiled_graph_count() - self._graphs_after_compile if self._compiled else None

    def write_random_checkpoint(self, path: Path) -> None:
        """Save the seeded random architecture where _load_checkpoint() reads it."""
        raise NotImplementedError(f"{type(self).__name__} builds random weights in place")

    def _load_checkpoint(self, path: Path) -> torch.nn.Module:
        raise NotImplementedError(f"{type(self).__name__} builds random weights in place")

    def infer(self, image: Image.Image) -> dict:
        """One timed run: preprocess, forward, postprocess, each timed with CUDA sync."""
        span = CudaSpan() if cuda_events_time(self.device.type, self.options.backend) else None
        with PeakMemory(self.device, self.mem_kind, self.gpu) as peak:
            t0 = clock(self.device)
            inputs = self.feed(image)
            t1 = clock(self.device)
            with torch.inference_mode():
                if span:
                    span.begin()
                outputs = self.run_forward(inputs)
                if span:
                    span.end()
                t2 = clock(self.device)
                self.postprocess(self.model_outputs(outputs), image)
            t3 = clock(self.device)
            shape = self.fed_shape(inputs)  # outside the timed spans
            del inputs, outputs
        self.input_shape = self.input_shape or shape  # the first image's, for the report
        return {
            "input_shape": shape,
            "preprocess_sec": t1 - t0,
            "inference_sec": t2 - t1,
            "inference_event_sec": span.seconds() if span else None,
            "postprocess_sec": t3 - t2,
            "peak_rss_mb": peak.rss_peak_mb,
            "peak_cuda_allocated_mb": peak.cuda_peak_mb,
            "peak_mb": peak.headline_mb,
        }

    def token_grids(self, inputs_shape: list[int]) -> list[tuple[int, int]]:
        height, width = inputs_shape[-2:]
        return [(height // s, width // s) for s in self.TOKEN_GRID_STRIDES]

    def dissect_layers(self, image: Image.Image, out_dir: Path, mode: str = "single-pass", verbose: bool = True,
                       limits: DissectLimits | None = None) -> dict:
        """Capture every leaf module's output on one image (see LayerDissector); eager, autocast to --dtype."""
        inputs = self.prepare(image)
        grids = self.token_grids(list(first_tensor(inputs)[0].shape))
        dissector = LayerDissector(self.model, out_dir, grids, verbose, limits)
        try:
            return dissector.run(lambda: self.run_forward(inputs, eager=True), mode)
        finally:
            if self.device.type == "cuda":
                cuda_empty_cache()

    def count_flops(self, image: Image.Image) -> tuple[int, dict[tuple[str, int], int], dict[str, int], str]:
        """FLOPs of one eager forward on image: in total, per leaf call and per flop_class, and
        where they came from: "counted" now, or "cache" (counted by an earlier run of the same
        architecture, input shapes and options: counting imports torch's compiler, seconds per model)."""
        inputs = self.prepare(image)
        key = flop_count_key(type(self).__name__, self.model, inputs, self.options)
        path = flop_cache_path(type(self).__name__, key)
        if (cached := read_flop_cache(path, key)) is not None:
            return (*cached, "cache")
        counted = count_flops(lambda: self.run_forward(inputs, eager=True), leaf_modules(self.model))
        write_flop_cache(path, key, *counted)
        return (*counted, "counted")

    def cleanup(self) -> None:
        """Free the model and processor (and compiled graphs), empty the CUDA cache, give heap pages back."""
        self.model = None
        self.processor = None
        self.runtime = None
        if self._compiled is not None:
            import torch._dynamo

            self._compiled = None
            torch._dynamo.reset()
        release_host_memory()
        if self.device.type == "cuda":
            cuda_empty_cache()

    def get_info(self) -> dict:
        """Model facts; call before cleanup() (NOTES.md 2)."""
        params = sum(p.numel() for p in self.model.parameters())
        return {
            "model_name": self.MODEL_NAME,
            "class_name": type(self).__name__,
            "short_name": self.SHORT_NAME,
            "input_size": self.INPUT_SIZE,
            "input_shape": self.input_shape,
            "total_params": params,
            "leaf_modules": len(leaf_modules(self.model)),
            "weights": self.weights,
            "weights_source": self.weight_source,
            "backend": f"{self.LIBRARY} {package_version(self.LIBRARY) or '?'}",
            "preprocess_note": self.PREPROCESS_NOTE,
            "notes": list(self.notes),
            "device": str(self.device),
            "checkpoint_dtype": self.checkpoint_dtype,
            "weights_dtype": stored_dtype_name(next((p.dtype for p in self.model.parameters()), None)),
        }

    # -- helpers for subclasses -----------------------------------------------------

    def _module_requirement(self, module: str, pip_name: str) -> Requirement:
        return Requirement("module", module, module_available(module), fix=f"python -m pip install {pip_name}")

    def _file_requirement(self, path: Path, host: str | None = ASSETS_HOST) -> Requirement:
        return Requirement("file", str(path), path.is_file(), host,
                           fix=f"place {path.name} in {path.parent}, or use --weights random")

    def _hub_requirement(self, repo_id: str) -> Requirement:
        return Requirement("hub", repo_id, hub_cached(repo_id), HF_HOST,
                           fix=f"download {repo_id} into the Hugging Face cache on a connected machine, or use --weights random")

    @contextlib.contextmanager
    def _weight_file_guard(self, path: Path, hub_repo: str | None = None):
        """Loading errors of an existing weight file (or a hub model's cache folder) become an
        actionable WeightFileError."""
        existed = path.exists()
        try:
            yield
        except Exception as e:
            if not existed or is_out_of_memory(e):
                raise
            what = f"the Hugging Face cache of {hub_repo}, {path}" if hub_repo else f"weight file {path}"
            fix = ("delete that folder (or run `hf cache delete`) so it downloads again" if hub_repo else
                   "delete it so it downloads again, or replace it")
            raise WeightFileError(f"{type(self).__name__}: could not load {what} ({type(e).__name__}: {e}). "
                                  f"It is probably truncated or not a checkpoint: {fix}.") from e


def stored_dtype_name(dtype: torch.dtype | None) -> str | None:
    """torch.float16 -> 'fp16' (the names --dtype uses), other dtypes by torch's name."""
    names = {v: k for k, v in DTYPES.items()}
    return None if dtype is None else names.get(dtype, str(dtype).replace("torch.", ""))


SAFETENSORS_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "float64"}


def hub_checkpoint_dtype(repo_id: str) -> str | None:
    """The floating dtype a cached hub checkpoint stores most of its weights in, read from the
    safetensors header (the first shard of a sharded one); None when it cannot be read."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, "model.safetensors")
    if not isinstance(path, str):
        index = try_to_load_from_cache(repo_id, "model.safetensors.index.json")
        if not isinstance(index, str):
            return None
        with contextlib.suppress(OSError, ValueError, StopIteration):
            shard = next(iter(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
            path = str(Path(index).parent / shard)
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (OSError, ValueError, TypeError):
        return None
    counts = collections.Counter(v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"] in SAFETENSORS_DTYPES)
    return SAFETENSORS_DTYPES[counts.most_common(1)[0][0]] if counts else None


def hub_cache_folder(repo_id: str) -> Path:
    """A hub model's folder in the local Hugging Face cache (whether or not it is there)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def hub_cached(repo_id: str) -> bool:
    """True when config and weights of a hub model are in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, name), str)

    return cached("config.json") and (cached("model.safetensors") or cached("model.safetensors.index.json"))


# --------------------------------------------------------------------------------------
# The eight models
# --------------------------------------------------------------------------------------


class HFDepthBenchmark(ModelBenchmark):
    """Depth models from transformers: processor -> pixel_values -> predicted_depth."""

    LIBRARY = "transformers"
    PARITY_TASK = "depth"
    MODEL_ID = ""
    MODEL_CLASS = ""          # transformers model class name
    MODEL_KWARGS: dict = {}

    def pretrained_source(self) -> str:
        return f"huggingface:{self.MODEL_ID}"

    def requirements(self) -> list[Requirement]:
        needs = [self._module_requirement("transformers", "'transformers>=4.53'")]
        if self.weights == "pretrained" and needs[0].present:  # the cache check needs huggingface_hub
            needs.append(self._hub_requirement(self.MODEL_ID))
        return needs

    def import_library(self) -> None:
        import transformers

        getattr(transformers, self.MODEL_CLASS)  # transformers imports model modules lazily
        transformers.AutoImageProcessor

    def download(self) -> bool:
        if self.weights != "pretrained" or hub_cached(self.MODEL_ID):
            return False
        from huggingface_hub import snapshot_download

        snapshot_download(self.MODEL_ID, allow_patterns=["*.json", "*.safetensors"])
        return True

    def _load_pretrained(self) -> torch.nn.Module:
        import transformers

        self.processor = transformers.AutoImageProcessor.from_pretrained(self.MODEL_ID, local_files_only=True)
        model_class = getattr(transformers, self.MODEL_CLASS)
        self.checkpoint_dtype = hub_checkpoint_dtype(self.MODEL_ID)
        # transformers 5 loads weights in their stored dtype by default: ask for float32, so a
        # checkpoint stored in half precision is not measured in it (--dtype autocasts instead).
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        with self._weight_file_guard(hub_cache_folder(self.MODEL_ID), hub_repo=self.MODEL_ID):
            return model_class.from_pretrained(self.MODEL_ID, local_files_only=True, **{dtype_key: torch.float32},
                                               **self.MODEL_KWARGS)

    def _build_random(self) -> torch.nn.Module:
        import transformers

        self.processor = self._random_processor()
        return getattr(transformers, self.MODEL_CLASS)(self._config())

    @abstractmethod
    def _config(self):
        """transformers config equal to the hub's (or reduced, see REDUCED_CONFIG_ENV)."""

    @abstractmethod
    def _random_processor(self):
        """The hub's image processor, built from its settings without the network."""

    def preprocess(self, image: Image.Image) -> dict:
        inputs = self.processor(images=image, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.device)}

    def forward(self, inputs: dict) -> Any:
        return self.model(**inputs)

    def postprocess(self, outputs: Any, image: Image.Image) -> Any:
        return self.processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])

    def task_result(self, result: Any, image: Image.Image) -> dict:
        """Depth at the image's size; DepthPro's field of view (degrees) where it has one."""
        if isinstance(result, torch.Tensor):  # the official Depth Anything V2 module
            return {"depth": result.float().cpu().numpy().squeeze(), "fov_deg": None}
        fov = result[0].get("field_of_view")
        return {"depth": result[0]["predicted_depth"].float().cpu().numpy().squeeze(),
                "fov_deg": float(fov) if fov is not None else None}


def dinov2_config(**overrides):
    from transformers import Dinov2Config

    return Dinov2Config(**overrides)


class DepthProBenchmark(HFDepthBenchmark):
    # Hardcoded configuration - modify these values to change model behavior
    MODEL_NAME = "DepthPro"
    SHORT_NAME = "depthpro"
    MODEL_ID = "apple/DepthPro-hf"  # HuggingFace model identifier
    INPUT_SIZE = 1536  # Native input: the processor resizes every image to 1536x1536 (NOTES.md 1)
    MODEL_CLASS = "DepthProForDepthEstimation"
    MODEL_KWARGS = {"use_fov_model": True}  # field-of-view head: metric depth plus focal length
    TOKEN_GRID_STRIDES = (64,)  # three DINOv2 ViT-L/16 encoders see 384-px patches as 24x24 tokens
    PREPROCESS_NOTE = "DepthProImageProcessor (fast): resize to 1536x1536, scale to [0,1], normalise mean 0.5 std 0.5"
    REDUCED_CONFIG_SUPPORTED = True

    # Uses HuggingFace transformers library
    # Auto-downloads model weights to the HF cache (~1.9 GB first time)
    # Provides metric depth estimation with field-of-view prediction

    def _config(self):
        from transformers import DepthProConfig

        if self.reduced:  # tests: same structure, tiny encoders and fusion, 768-px input (192-px patches)
            vit = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=192, patch_size=16)
            return DepthProConfig(use_fov_model=True, patch_size=192, image_model_config=dinov2_config(**vit),
                                  patch_model_config=dinov2_config(**vit), fov_model_config=dinov2_config(**vit),
                                  fusion_hidden_size=32, intermediate_hook_ids=[1, 0],
                                  intermediate_feature_dims=[32, 32], scaled_images_feature_dims=[64, 64, 32])
        vit = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384, patch_size=16)
        return DepthProConfig(use_fov_model=True, image_model_config=dinov2_config(**vit),
                              patch_model_config=dinov2_config(**vit), fov_model_config=dinov2_config(**vit))

    def _random_processor(self):
        size = {"height": 768, "width": 768} if self.reduced else {"height": 1536, "width": 1536}
        return fast_processor("DepthProImageProcessor")(size=size)  # other defaults equal the hub's


def fast_processor(name: str):
    """transformers >= 5 names the fast (torch) image processors without the Fast suffix."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return getattr(transformers, name if major >= 5 else name + "Fast")


class DepthAnythingV2Benchmark(HFDepthBenchmark):
    """Depth Anything V2 through transformers' port, or the official module when installed.

    The official implementation is used when `depth_anything_v2` is importable (git clone
    https://github.com/DepthAnything/Depth-Anything-V2, add it to PYTHONPATH) and
    models/depth_anything_v2_<variant>.pth exists. When neither can be had, the model is
    skipped with a message (the spec).
    """

    MODEL_CLASS = "DepthAnythingForDepthEstimation"
    INPUT_SIZE = 518
    TOKEN_GRID_STRIDES = (14,)  # DINOv2 patch size
    DYNAMIC_INPUT_HW = True  # the aspect ratio is kept: each image its own height and width
    PREPROCESS_NOTE = ("DPTImageProcessor: resize keeping aspect ratio so the short side is 518 and both sides "
                       "are multiples of 14 (bicubic), scale to [0,1], ImageNet mean/std")
    VARIANT = ""
    FEATURES = 0
    OUT_CHANNELS: list[int] = []
    VIT: dict = {}
    official = False  # set by load(): the official implementation is in use

    @property
    def official_checkpoint(self) -> Path:
        return self.models_dir / f"depth_anything_v2_{self.VARIANT}.pth"

    @property
    def use_official(self) -> bool:
        return (self.weights == "pretrained" and module_available("depth_anything_v2")
                and self.official_checkpoint.is_file())

    def pretrained_source(self) -> str:
        return str(self.official_checkpoint) if self.use_official else super().pretrained_source()

    def requirements(self) -> list[Requirement]:
        if self.use_official:
            return [Requirement("file", str(self.official_checkpoint), True)]
        return super().requirements()

    def download(self) -> bool:
        if self.use_official:
            return False
        try:
            return super().download()
        except Exception as e:  # the download failed (preflight saw the hub reachable): the spec's skip
            if is_out_of_memory(e):
                raise
            raise ModelUnavailable(f"{self.MODEL_ID} could not be downloaded: {type(e).__name__}: {e}") from e

    def _load_pretrained(self) -> torch.nn.Module:
        if self.use_official:
            self.official = True
            return self._load_official()
        model = super()._load_pretrained()
        got = (model.config.fusion_hidden_size, list(model.config.neck_hidden_sizes))
        if got != (self.FEATURES, self.OUT_CHANNELS):
            raise BenchError(f"{self.MODEL_ID} has features/out_channels {got}, expected "
                             f"{(self.FEATURES, self.OUT_CHANNELS)}: wrong checkpoint for {type(self).__name__}")
        return model

    def _load_official(self) -> torch.nn.Module:
        from depth_anything_v2.dpt import DepthAnythingV2

        model = DepthAnythingV2(encoder=self.VARIANT, features=self.FEATURES, out_channels=self.OUT_CHANNELS)
        with self._weight_file_guard(self.official_checkpoint):
            state = torch.load(self.official_checkpoint, map_location="cpu", weights_only=True)
            self.checkpoint_dtype = stored_dtype_name(next((t.dtype for t in state.values() if t.is_floating_point()), None))
            model.load_state_dict(state)  # copied into the float32 parameters
        self.processor = self._random_processor()  # same resize/normalisation as the official image2tensor
        self.LIBRARY = "depth_anything_v2"
        return model

    def forward(self, inputs: dict) -> Any:
        if self.official:
            return self.model(inputs["pixel_values"])
        return self.model(**inputs)

    def postprocess(self, outputs: Any, image: Image.Image) -> Any:
        if self.official:  # (B, H, W) relative depth
            return F.interpolate(outputs[:, None], (image.height, image.width), mode="bilinear")
        return super().postprocess(outputs, image)

    def _config(self):
        from transformers import DepthAnythingConfig

        vit, neck, features = self.VIT, self.OUT_CHANNELS, self.FEATURES
        if self.reduced:  # tests: the Small variant's widths with four blocks
            vit = dict(DepthAnythingV2SmallBenchmark.VIT, num_hidden_layers=4, out_indices=[1, 2, 3, 4])
            neck, features = DepthAnythingV2SmallBenchmark.OUT_CHANNELS, DepthAnythingV2SmallBenchmark.FEATURES
        backbone = dinov2_config(image_size=518, patch_size=14, reshape_hidden_states=False, **vit)
        return DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=neck, fusion_hidden_size=features,
                                   reassemble_hidden_size=vit["hidden_size"], head_hidden_size=32)

    def _random_processor(self):
        return fast_processor("DPTImageProcessor")(
            do_resize=True, size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
            resample=Image.Resampling.BICUBIC, do_rescale=True, do_normalize=True,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=False)


class DepthAnythingV2SmallBenchmark(DepthAnythingV2Benchmark):
    # Requires depth_anything_v2 module: git clone https://github.com/DepthAnything/Depth-Anything-V2
    # (optional: without it the transformers port below is used, same architecture and weights)
    MODEL_NAME = "DepthAnythingV2-Small"
    SHORT_NAME = "dav2-small"
    MODEL_ID = "depth-anything/Depth-Anything-V2-Small-hf"
    VARIANT = "vits"
    FEATURES = 64                       # transformers: fusion_hidden_size
    OUT_CHANNELS = [48, 96, 192, 384]   # transformers: neck_hidden_sizes
    VIT = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, out_indices=[3, 6, 9, 12])


class DepthAnythingV2BaseBenchmark(DepthAnythingV2Benchmark):
    MODEL_NAME = "DepthAnythingV2-Base"
    SHORT_NAME = "dav2-base"
    MODEL_ID = "depth-anything/Depth-Anything-V2-Base-hf"
    VARIANT = "vitb"
    FEATURES = 128
    OUT_CHANNELS = [96, 192, 384, 768]
    VIT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, out_indices=[3, 6, 9, 12])
    REDUCED_CONFIG_SUPPORTED = True


class DepthAnythingV2LargeBenchmark(DepthAnythingV2Benchmark):
    MODEL_NAME = "DepthAnythingV2-Large"
    SHORT_NAME = "dav2-large"
    MODEL_ID = "depth-anything/Depth-Anything-V2-Large-hf"
    VARIANT = "vitl"
    FEATURES = 256
    OUT_CHANNELS = [256, 512, 1024, 1024]
    VIT = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, out_indices=[5, 12, 18, 24])
    REDUCED_CONFIG_SUPPORTED = True


class UltralyticsBenchmark(ModelBenchmark):
    """Models from Ultralytics: weight files in the models dir, auto-downloaded when missing."""

    LIBRARY = "ultralytics"
    MODEL_PATH = ""  # file name inside --models-dir
    IMPORTS = ("ultralytics.nn.tasks", "ultralytics.data.augment", "ultralytics.utils.ops", "ultralytics.models")

    @property
    def weight_path(self) -> Path:
        return self.models_dir / self.MODEL_PATH

    def pretrained_source(self) -> str:
        return str(self.weight_path)

    def requirements(self) -> list[Requirement]:
        needs = [self._module_requirement("ultralytics", "'ultralytics>=8.3.0'")]
        if self.weights == "pretrained":
            needs.append(self._file_requirement(self.weight_path))
        return needs

    def download(self) -> bool:
        if self.weights != "pretrained" or self.weight_path.is_file():
            return False
        from ultralytics.utils.downloads import attempt_download_asset

        self.weight_path.parent.mkdir(parents=True, exist_ok=True)
        attempt_download_asset(str(self.weight_path))
        if not self.weight_path.is_file():
            raise BenchError(f"{type(self).__name__}: {self.MODEL_PATH} could not be downloaded into "
                             f"{self.weight_path.parent}: place it there by hand, or use --weights random")
        return True

    def _load_pretrained(self) -> torch.nn.Module:
        with self._weight_file_guard(self.weight_path):
            return self._load_file(str(self.weight_path))

    def _load_checkpoint(self, path: Path) -> torch.nn.Module:
        return self._load_file(str(path))

    def write_random_checkpoint(self, path: Path) -> None:
        torch.save({"model": self._build_random(), "train_args": {}}, path)  # Ultralytics' checkpoint layout

    @abstractmethod
    def _load_file(self, path: str) -> torch.nn.Module:
        """Load a checkpoint file through Ultralytics' own loader."""

    def _letterbox(self, image: Image.Image, center: bool) -> np.ndarray:
        from ultralytics.data.augment import LetterBox

        return LetterBox(new_shape=(self.INPUT_SIZE, self.INPUT_SIZE), auto=False, center=center)(image=np.asarray(image))


class YOLO11Benchmark(UltralyticsBenchmark):
    """YOLO11n detect/segment/pose: letterbox to 640x640, unfused model as loaded, NMS."""

    INPUT_SIZE = 640
    MODEL_YAML = ""
    MODEL_TASK_CLASS = ""   # ultralytics.nn.tasks class built from MODEL_YAML
    NUM_CLASSES = 80
    RANDOM_BUILD_RUNS_FORWARD = True  # the builder runs a 256x256 forward to find the strides
    PREPROCESS_NOTE = "Ultralytics LetterBox to 640x640 (gray padding 114), scale to [0,1]; NMS conf 0.25 IoU 0.7"

    def _load_file(self, path: str) -> torch.nn.Module:
        from ultralytics import YOLO

        return YOLO(path).model

    def _build_random(self) -> torch.nn.Module:
        from ultralytics.nn import tasks

        return getattr(tasks, self.MODEL_TASK_CLASS)(self.MODEL_YAML, nc=self.NUM_CLASSES, verbose=False)

    def fuse(self) -> str | None:
        self.model = self.model.fuse(verbose=False)  # what Ultralytics' predict() runs
        return None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        boxed = self._letterbox(image, center=True)
        tensor = torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1))).to(self.device)
        return (tensor.float() / 255.0)[None]

    def forward(self, inputs: torch.Tensor) -> Any:
        return self.model(inputs)

    def postprocess(self, outputs: Any, image: Image.Image) -> Any:
        from ultralytics.utils import ops

        try:
            from ultralytics.utils.nms import non_max_suppression
        except ImportError:  # early Ultralytics 8.3 releases kept NMS in ops
            non_max_suppression = ops.non_max_suppression

        preds, protos = split_yolo_outputs(outputs)
        det = non_max_suppression(preds, conf_thres=0.25, iou_thres=0.7, nc=len(self.model.names))[0]
        shape = (self.INPUT_SIZE, self.INPUT_SIZE)
        masks = ops.process_mask(protos[0], det[:, 6:], det[:, :4], shape, upsample=True) if protos is not None and len(det) else None
        det[:, :4] = ops.scale_boxes(shape, det[:, :4], (image.height, image.width))
        return det, masks

    def task_result(self, result: Any, image: Image.Image) -> dict:
        """Boxes (image pixels), confidences and classes; segment: masks; pose: keypoints in image pixels."""
        from ultralytics.utils import ops

        det, masks = result
        det = det.float().cpu()
        found = {"boxes": det[:, :4].numpy(), "scores": det[:, 4].numpy(), "classes": det[:, 5].numpy()}
        if self.PARITY_TASK == "segment":
            found["masks"] = (masks.float().cpu().numpy() > 0.5) if masks is not None else np.zeros((0, 1, 1), bool)
        if self.PARITY_TASK == "pose":
            kpts = det[:, 6:].reshape(len(det), *getattr(self.model.model[-1], "kpt_shape", (17, 3)))  # the Pose head's
            found["keypoints"] = ops.scale_coords((self.INPUT_SIZE, self.INPUT_SIZE), kpts.clone(),
                                                  (image.height, image.width)).numpy()
        return found


def split_yolo_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(predictions, mask prototypes or None) from a YOLO model's eval output, in the layout of
    every Ultralytics version requirements.txt allows:
    8.4: segment [(preds, proto), extras], detect/pose [preds, extras];
    8.3: segment (preds, (feats, mask_coefficients, proto)), detect/pose (preds, feats or (feats, kpts)).
    """
    if isinstance(outputs, torch.Tensor):
        return outputs, None
    head, rest = outputs[0], (outputs[1] if len(outputs) > 1 else None)
    if isinstance(head, (tuple, list)):
        return head[0], head[1]
    if (isinstance(rest, (tuple, list)) and len(rest) == 3 and all(isinstance(t, torch.Tensor) for t in rest[1:])
            and rest[1].dim() == 3 and rest[2].dim() == 4):
        return head, rest[2]
    return head, None


class YOLO11nDetectBenchmark(YOLO11Benchmark):
    # Uses Ultralytics library, auto-downloads if models/yolo11n.pt missing
    MODEL_NAME = "YOLO11n-Detect"
    SHORT_NAME = "yolo11n-detect"
    MODEL_PATH = "yolo11n.pt"
    MODEL_YAML = "yolo11n.yaml"
    MODEL_TASK_CLASS = "DetectionModel"
    PARITY_TASK = "detect"


class YOLO11nSegmentBenchmark(YOLO11Benchmark):
    # Uses Ultralytics library, auto-downloads if models/yolo11n-seg.pt missing
    MODEL_NAME = "YOLO11n-Segment"
    SHORT_NAME = "yolo11n-seg"
    MODEL_PATH = "yolo11n-seg.pt"
    MODEL_YAML = "yolo11n-seg.yaml"
    MODEL_TASK_CLASS = "SegmentationModel"
    PARITY_TASK = "segment"


class YOLO11nPoseBenchmark(YOLO11Benchmark):
    # Uses Ultralytics library, auto-downloads if models/yolo11n-pose.pt missing
    MODEL_NAME = "YOLO11n-Pose"
    SHORT_NAME = "yolo11n-pose"
    MODEL_PATH = "yolo11n-pose.pt"
    MODEL_YAML = "yolo11n-pose.yaml"
    MODEL_TASK_CLASS = "PoseModel"
    PARITY_TASK = "pose"
    NUM_CLASSES = 1  # yolo11n-pose.pt is trained on COCO keypoints: one class, person (17 keypoints)


class MobileSAMBenchmark(UltralyticsBenchmark):
    # Uses Ultralytics library, auto-downloads if models/mobile_sam.pt missing
    # Prompted with one positive point at the image centre: image encoder + prompt encoder + mask decoder
    MODEL_NAME = "MobileSAM"
    SHORT_NAME = "mobilesam"
    MODEL_PATH = "mobile_sam.pt"
    INPUT_SIZE = 1024
    PARITY_TASK = "mask"
    TOKEN_GRID_STRIDES = (4, 8, 16)  # TinyViT stages and the mask decoder's 64x64 image tokens
    PREPROCESS_NOTE = ("Ultralytics LetterBox: longest side to 1024, padded bottom-right to 1024x1024, "
                       "SAM pixel mean/std; prompt: one positive point at the image centre")

    def _load_file(self, path: str) -> torch.nn.Module:
        from ultralytics import SAM

        return SAM(path).model

    def _build_random(self) -> torch.nn.Module:
        from ultralytics.models.sam.build import build_mobile_sam

        return build_mobile_sam()

    def fuse(self) -> str | None:
        """Ultralytics' Conv+BN fusion on the TinyViT encoder's Conv2d_BN pairs (the rest has no BN)."""
        from ultralytics.models.sam.modules.tiny_encoder import Conv2d_BN
        from ultralytics.utils.torch_utils import fuse_conv_and_bn

        pairs = [m for m in self.model.modules() if isinstance(m, Conv2d_BN)]
        for pair in pairs:
            pair.c = fuse_conv_and_bn(pair.c, pair.bn)
            del pair.bn  # a Sequential runs what is left: the fused conv
        return f"--fuse: {len(pairs)} Conv+BN pairs of the image encoder fused"

    def preprocess(self, image: Image.Image) -> dict:
        boxed = torch.from_numpy(self._letterbox(image, center=False)).to(self.device).permute(2, 0, 1).float()
        pixels = (boxed - self.model.pixel_mean) / self.model.pixel_std
        scale = self.INPUT_SIZE / max(image.width, image.height)
        point = torch.tensor([[[image.width / 2 * scale, image.height / 2 * scale]]], device=self.device)
        return {"pixel_values": pixels[None], "points": point, "labels": torch.ones((1, 1), device=self.device)}

    def forward(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        sam = self.model
        embeddings = sam.image_encoder(inputs["pixel_values"])
        sparse, dense = sam.prompt_encoder(points=(inputs["points"], inputs["labels"]), boxes=None, masks=None)
        return sam.mask_decoder(image_embeddings=embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)

    def postprocess(self, outputs: tuple[torch.Tensor, torch.Tensor], image: Image.Image) -> torch.Tensor:
        low_res, _ = outputs
        masks = F.interpolate(low_res, (self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False)
        scale = self.INPUT_SIZE / max(image.width, image.height)
        masks = masks[..., : round(image.height * scale), : round(image.width * scale)]
        return F.interpolate(masks, (image.height, image.width), mode="bilinear", align_corners=False) > 0

    def task_result(self, result: torch.Tensor, image: Image.Image) -> dict:
        return {"mask": result.cpu().numpy().squeeze()}


MODEL_REGISTRY: list[type[ModelBenchmark]] = [
    DepthProBenchmark,
    DepthAnythingV2SmallBenchmark,
    DepthAnythingV2BaseBenchmark,
    DepthAnythingV2LargeBenchmark,
    YOLO11nDetectBenchmark,
    YOLO11nSegmentBenchmark,
    YOLO11nPoseBenchmark,
    MobileSAMBenchmark,
]
SKIPPABLE = (DepthAnythingV2Benchmark,)  # the spec: skip DA-V2 when it can't be had


def resolve_models(spec: str | None) -> list[type[ModelBenchmark]]:
    """--models: comma-separated short or class names, case-insensitive; default (None) all eight."""
    if spec is None:
        return list(MODEL_REGISTRY)
    by_name = {}
    for cls in MODEL_REGISTRY:
        by_name[cls.SHORT_NAME.lower()] = by_name[cls.__name__.lower()] = cls
    chosen: list[type[ModelBenchmark]] = []
    for name in (n.strip().lower() for n in spec.split(",") if n.strip()):
        if name not in by_name:
            valid = ", ".join(c.SHORT_NAME for c in MODEL_REGISTRY)
            raise UsageError(f"unknown model '{name}'. Valid models: {valid} (or their class names)")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    if not chosen:
        raise UsageError("--models is empty: give model names, e.g. --models yolo11n-detect,mobilesam "
                         "(leave the option out for all eight)")
    return chosen


def check_requirements(benches: list[ModelBenchmark]) -> dict[str, list[str]]:
    """Per class name, the problems that stop it (missing and not downloadable)."""
    needs = {type(b).__name__: b.requirements() for b in benches}
    hosts = sorted({r.host for rs in needs.values() for r in rs if not r.present and r.host})
    reachable = host_reachable(hosts) if hosts and network_allowed() else {h: False for h in hosts}
    problems: dict[str, list[str]] = {}
    for name, reqs in needs.items():
        for r in reqs:
            if r.present or (r.host and reachable[r.host]):
                continue
            offline = f" and {r.host} is unreachable" if r.host else ""
            problems.setdefault(name, []).append(f"{r.kind} {r.name} is missing{offline}: {r.fix}")
    return problems


# --------------------------------------------------------------------------------------
# Runtimes: the forward exported to ONNX (cached), run by ONNX Runtime (CPU, CUDA, TensorRT) or OpenVINO
# --------------------------------------------------------------------------------------

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
BACKEND_PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino"),  # import names
                    "tensorrt": ("onnx", "onnxruntime", "tensorrt")}  # ONNX Runtime's TensorRT provider, TensorRT
# torch.onnx.export's two exporters, in the order tried, each with its pinned opset: the TorchScript
# one (dynamo=False) first, it needs nothing more; the dynamo one (onnxscript, opset 18 at least)
# where it cannot export a model (MobileSAM's LayerNorm2d reads its shape as a tensor).
ONNX_EXPORTERS = {"torchscript": 17, "dynamo": 18}
ONNX_OPSET = ONNX_EXPORTERS["torchscript"]  # LayerNormalization is an operator from 17 on
EXPORTS_DIR_NAME = "exports"   # under the models folder: one folder per export key
ENGINES_DIR_NAME = "engines"   # under the models folder: TensorRT engines and timing caches, one folder per key
CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = {"onnxruntime": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}  # on CUDA
EXPORT_FILE_NAME = "model.onnx"
EXPORT_META_NAME = "export.json"


# PyTorch's own options, as a runtime's row runs them (the exported graph is float32 and eager).
TORCH_ONLY_DEFAULTS = {"dtype": "fp32", "compile": None, "channels_last": False}


def torch_only_flags(options: "RunOptions") -> list[str]:
    """The PyTorch options among these (a runtime runs the model exported in float32, eager)."""
    return [flag for flag, on in (("--compile", options.compile), ("--channels-last", options.channels_last),
                                  (f"--dtype {options.dtype}", options.dtype != "fp32")) if on]


def backend_problem(backends: list[str], device_type: str, options: "RunOptions") -> str | None:
    """Why these backends cannot run with these options on this device (a usage error), or None.
    PyTorch's own options beside a runtime are a problem only without a torch row to apply them to."""
    for backend in backends:
        if backend == "tensorrt" and device_type != "cuda":
            return "--backend tensorrt needs a CUDA device (TensorRT runs on NVIDIA GPUs only): add --device cuda"
        if backend == "openvino" and device_type != "cpu":
            return ("--backend openvino runs on the CPU (OpenVINO's GPU device is an Intel GPU's): add --device cpu, "
                    "or use onnxruntime or tensorrt on CUDA")
    runtimes = [b for b in backends if b != "torch"]
    if runtimes and "torch" not in backends and (flags := torch_only_flags(options)):
        return (f"{', '.join(flags)} {'is a PyTorch option' if len(flags) == 1 else 'are PyTorch options'}, "
                f"and --backend {','.join(runtimes)} runs the model exported in float32: leave them out, or add "
                f"torch to --backend for rows they apply to")
    return None


def backend_options(options: "RunOptions", backend: str) -> tuple["RunOptions", list[str]]:
    """The options one backend's rows run with, and what was left out of them, said in the row:
    --dtype, --compile and --channels-last are PyTorch's, applied to the torch rows only."""
    if backend == "torch":
        return replace(options, backend="torch"), []
    flags = torch_only_flags(options)
    clean = replace(options, backend=backend, **TORCH_ONLY_DEFAULTS)
    return clean, [f"{', '.join(flags)}: applied to the torch rows only; {backend} runs the model exported "
                   f"in float32"] if flags else []


def parse_backends(text: str) -> list[str]:
    """--backend LIST: comma separated, each once, in the order given (the first is the baseline)."""
    backends = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if not backends or unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {', '.join(unknown) or repr(text)}: choose from "
                                         f"{', '.join(BACKENDS)}, comma separated")
    if len(set(backends)) < len(backends):
        raise argparse.ArgumentTypeError(f"a backend is named twice in {text!r}: name each once")
    return backends


def missing_backend_packages(backend: str) -> list[str]:
    """The pip packages a backend needs that this Python cannot import (a preflight problem)."""
    return [name for name in BACKEND_PACKAGES.get(backend, ()) if not module_available(name)]


def backend_preflight(backends: list[str], device_type: str) -> list[str]:
    """What this Python lacks for the backends on this device: a package, or (on CUDA) ONNX
    Runtime's GPU provider. Here before a local run, on each node before a Ray run."""
    problems = []
    for backend in backends:
        if missing := missing_backend_packages(backend):
            install = [f"{name}-gpu" if backend == "tensorrt" and name == "onnxruntime" else name
                       for name in missing]  # onnxruntime-gpu is imported as onnxruntime
            problems.append(f"--backend {backend} needs the Python package(s) {', '.join(missing)}, which this Python "
                            f"cannot import: pip install {' '.join(install)}")
        elif backend in GPU_PROVIDERS and device_type == "cuda":
            import onnxruntime as ort

            if problem := provider_problem(backend, device_type, ort.get_available_providers()):
                problems.append(problem)
    return problems


def preflight_error(where: str, problems: list[str]) -> UsageError:
    """Exit 2 with every problem the preflight found, one a line, so that one pass fixes them all."""
    return UsageError(f"preflight {where} found {len(problems)} problem(s); nothing was run:\n  - " + "\n  - ".join(problems))


def output_skeleton(value: Any, leaves: list[torch.Tensor]) -> Any:
    """A model's outputs as JSON, each tensor replaced by its place in leaves (the exported
    graph's outputs, in order); rebuild_outputs() puts a runtime's tensors back in its place."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return {"tensor": len(leaves) - 1}
    if isinstance(value, dict):  # transformers' ModelOutput is a dict: rebuilt as its own class
        kind = "dict" if type(value) is dict else f"{type(value).__module__}:{type(value).__qualname__}"
        return {"map": kind, "items": [[k, output_skeleton(v, leaves)] for k, v in value.items()]}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return {"seq": type(value).__name__, "items": [output_skeleton(v, leaves) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise BenchError(f"an output of type {type(value).__name__} cannot be exported to ONNX")


def rebuild_outputs(skeleton: Any, leaves: list[torch.Tensor]) -> Any:
    """output_skeleton's structure with the runtime's tensors in it (what postprocess() reads)."""
    if "tensor" in skeleton:
        return leaves[skeleton["tensor"]]
    if "value" in skeleton:
        return skeleton["value"]
    if "seq" in skeleton:
        items = [rebuild_outputs(item, leaves) for item in skeleton["items"]]
        return items if skeleton["seq"] == "list" else tuple(items)
    fields = {k: rebuild_outputs(v, leaves) for k, v in skeleton["items"]}
    if skeleton["map"] == "dict":
        return fields
    module, name = skeleton["map"].split(":")
    return functools.reduce(getattr, name.split("."), importlib.import_module(module))(**fields)


def input_leaves(inputs: Any) -> tuple[list[str], list[torch.Tensor]]:
    """A model's inputs (a tensor, or a dict of tensors) as the exported graph's named inputs."""
    if isinstance(inputs, torch.Tensor):
        return ["images"], [inputs]
    if isinstance(inputs, dict) and all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return list(inputs), list(inputs.values())
    raise BenchError(f"inputs of type {type(inputs).__name__} cannot be exported to ONNX")


class FlatForward(torch.nn.Module):
    """The benchmark's forward() with flat tensors in and out, for the exporter; skeleton() is the
    structure of its outputs from one eager call."""

    def __init__(self, bench: "ModelBenchmark", names: list[str], as_dict: bool):
        super().__init__()
        self.model = bench.model  # registered here, so its weights are the graph's initializers
        self.bench, self.names, self.as_dict = bench, names, as_dict

    def structured(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        return self.bench.forward(dict(zip(self.names, tensors)) if self.as_dict else tensors[0])

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves: list[torch.Tensor] = []
        output_skeleton(self.structured(tensors), leaves)
        return tuple(leaves)

    def skeleton(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        with torch.no_grad():  # eager: the dynamo exporter runs forward() on fake tensors, side effects lost
            return output_skeleton(self.structured(tensors), [])


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes): the export cache's
    'same weights', whatever file or hub folder they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def export_key(bench: "ModelBenchmark", names: list[str], tensors: list[torch.Tensor]) -> dict:
    """Everything an export depends on: model, weights, torch and the exporter, opset, options, inputs."""
    return {"model": type(bench).__name__, "weights_sha256": weights_digest(bench.model), "torch": torch.__version__,
            "exporters": ONNX_EXPORTERS, "fuse": bench.options.fuse,
            "reduced": bench.reduced, "dynamic_hw": bench.DYNAMIC_INPUT_HW,
            "inputs": [[n, str(t.dtype), list(t.shape)] for n, t in zip(names, tensors)]}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def cached_export(folder: Path, key: dict) -> tuple[dict | None, str | None]:
    """The export in folder when its record matches key and every file it lists is there with
    its size and SHA-256; else (None, why it is not used) - a truncated or corrupt file included."""
    record_path = folder / EXPORT_META_NAME
    if not record_path.is_file():
        return None, None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("key") != key:
            return None, "the cached export's record does not match this model"
        for name, (size, sha) in record["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size or file_digest(path) != sha:
                return None, f"the cached {name} is truncated or corrupt (size or SHA-256 differs)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"the cached export's record is unreadable ({type(e).__name__}: {e})"
    return record, None


def export_onnx(bench: "ModelBenchmark", image: Image.Image, exports_dir: Path) -> dict:
    """The forward as the PyTorch row runs it (after --fuse), exported to ONNX with a pinned opset
    and checked with onnx.checker; cached under exports_dir by export_key, a cached file that is
    truncated or corrupt exported again. External data files past 2 GB (the exporter's choice)."""
    import onnx

    inputs = bench.prepare(image)
    names, tensors = input_leaves(inputs)
    key = export_key(bench, names, tensors)
    folder = exports_dir / f"{type(bench).__name__}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
    record, why_not = cached_export(folder, key)
    if record is not None:
        return {**record, "path": str(folder / EXPORT_FILE_NAME), "cached": True, "note": None}
    work = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
    except OSError as e:
        raise OutputError(f"cannot write the ONNX export under {exports_dir} ({e.strerror or e}): make it a writable "
                          f"folder, or pass --models-dir") from None
    try:
        graph = FlatForward(bench, names, isinstance(inputs, dict)).eval()
        exporter, fallback = write_onnx(graph, tuple(tensors), work, bench.DYNAMIC_INPUT_HW)
        onnx.checker.check_model(str(work / EXPORT_FILE_NAME))  # by path: models with external data too
        files = {p.name: [p.stat().st_size, file_digest(p)] for p in sorted(work.iterdir())}
        record = {"key": key, "skeleton": graph.skeleton(tuple(tensors)), "input_names": names, "files": files,
                  "exporter": exporter, "opset": ONNX_EXPORTERS[exporter], "exporter_fallback": fallback,
                  "onnx": onnx.__version__, "mb": sum(size for size, _ in files.values()) / 1024**2}
        atomic_write_text(work / EXPORT_META_NAME, json.dumps(record, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**record, "path": str(folder / EXPORT_FILE_NAME), "cached": False, "note": why_not and why_not + ": exported again"}


def write_onnx(graph: FlatForward, tensors: tuple[torch.Tensor, ...], folder: Path, dynamic_hw: bool) -> tuple[str, str | None]:
    """folder/model.onnx by the first exporter of ONNX_EXPORTERS that can export the graph: (the
    exporter, why the one before it could not, or None). Neither: the TorchScript one's error."""
    names = graph.names
    dynamic = {names[0]: {2: "height", 3: "width"}} if dynamic_hw else None
    path = str(folder / EXPORT_FILE_NAME)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings: what they say is checked by the parity check
        with quiet_fds(1):  # on a failure its C++ log prints the whole graph on stdout (thousands of lines)
            try:
                torch.onnx.export(graph, tensors, path, dynamo=False, opset_version=ONNX_EXPORTERS["torchscript"],
                                  input_names=names, dynamic_axes=dynamic, do_constant_folding=True)
                return "torchscript", None
            except Exception as e:  # noqa: BLE001 - any exporter failure: the other exporter may manage
                failed = f"the TorchScript exporter failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        if not module_available("onnxscript"):
            raise BenchError(f"{failed}, and the dynamo exporter needs onnxscript: pip install onnxscript") from None
        for leftover in folder.iterdir():
            leftover.unlink()
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines are not this program's console
            torch.onnx.export(graph, tensors, path, dynamo=True, opset_version=ONNX_EXPORTERS["dynamo"],
                              input_names=names, dynamic_axes=dynamic)
        return "dynamo", failed + ": the dynamo exporter was used"


def ort_providers(backend: str, device: torch.device, engine_dir: Path | None) -> list[tuple[str, dict]]:
    """ONNX Runtime's execution providers for a row, most preferred first: the CPU's on the CPU;
    on CUDA the row's GPU provider on the row's device index (CUDA's ordinal, as torch's), CUDA's
    behind TensorRT for the nodes TensorRT cannot run, the CPU's last. TensorRT caches its engines
    and its timing cache in engine_dir."""
    if device.type != "cuda":
        return [(CPU_PROVIDER, {})]
    index = str(device.index)
    chain = [("CUDAExecutionProvider", {"device_id": index, "use_tf32": "1"}), (CPU_PROVIDER, {})]  # its default, said
    if backend == "tensorrt":
        chain.insert(0, ("TensorrtExecutionProvider", {
            "device_id": index, "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(engine_dir),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(engine_dir)}))
    return chain


def runtime_tf32(backend: str, device_type: str) -> dict[str, bool] | None:
    """Whether a runtime's float32 convolutions and matrix products run as TF32 on CUDA: yes for
    ONNX Runtime's CUDA provider (use_tf32, its default, set by ort_providers) and for TensorRT
    (it builds float32 engines with TF32 allowed); None for torch rows and the CPU (torch's flags)."""
    if device_type != "cuda" or backend == "torch":
        return None
    return {"conv": True, "matmul": True}


def provider_problem(backend: str, device_type: str, available: list[str]) -> str | None:
    """Why this onnxruntime cannot run the backend on this device (a preflight problem), or None."""
    wanted = GPU_PROVIDERS.get(backend) if device_type == "cuda" else None
    if wanted is None or wanted in available:
        return None
    install = "pip install onnxruntime-gpu tensorrt" if backend == "tensorrt" else "pip install onnxruntime-gpu"
    return (f"--backend {backend} on CUDA needs ONNX Runtime's {wanted}, and this onnxruntime offers only "
            f"{', '.join(available)}: pip uninstall -y onnxruntime; {install}")


def provider_fallback_problem(asked: str, created: list[str]) -> str | None:
    """ONNX Runtime drops a provider it cannot create (a missing CUDA or cuDNN library) with a log
    line, and runs every node on the CPU: that is a failed load, never a silently CPU-run row."""
    if asked in created:
        return None
    return (f"ONNX Runtime did not create {asked} (it created {', '.join(created)} only), so every node would run on "
            f"the CPU: the CUDA, cuDNN or TensorRT libraries it needs are missing or of another version")


def node_placement(assignment: list[tuple[str, list[str]]], asked: str) -> dict:
    """Which provider runs how many of the graph's nodes (assignment: (provider, [op type]) per
    subgraph), and, when a GPU provider was asked for, the nodes left on the CPU and their op types:
    a node run on the CPU is host time inside a GPU row's figures."""
    by_provider: collections.Counter = collections.Counter()
    cpu_ops: collections.Counter = collections.Counter()
    for provider, ops in assignment:
        by_provider[provider] += len(ops)
        if provider == CPU_PROVIDER:
            cpu_ops.update(ops)
    gpu_asked = asked != CPU_PROVIDER
    return {"runtime_nodes_by_provider": dict(by_provider),
            "runtime_cpu_nodes": sum(cpu_ops.values()) if gpu_asked else None,
            "runtime_cpu_node_ops": dict(cpu_ops.most_common()) if gpu_asked else None}


def engine_folder(engines_dir: Path, export_path: str, facts: dict) -> Path:
    """Where TensorRT's engines for one export live: keyed by the export (its folder is its key),
    onnxruntime's version and the GPU (name, compute capability); TensorRT checks its own files too."""
    key = json.dumps({"export": Path(export_path).parent.name, **facts}, sort_keys=True)
    return engines_dir / f"{Path(export_path).parent.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def engine_cache_hit(files_before: dict[str, tuple[int, int]], files_after: dict[str, tuple[int, int]]) -> bool:
    """Whether the engine build read cached engines only: there were some, and none was added or
    rewritten (TensorRT rebuilds an engine in place, under its old name)."""
    return bool(files_before) and files_after == files_before


@dataclass
class BoundInputs:
    """feed()'s result for ONNX Runtime: the IO binding, and the tensors it points into (kept alive)."""

    binding: Any
    tensors: dict[str, torch.Tensor]


class RuntimeForward:
    """A runtime behind ModelBenchmark.run_forward: feed() turns the prepared inputs into what the
    runtime reads (in the preprocessing span), run() is the forward the latency figures time,
    unpack() turns its results into the tensors postprocess() reads (in the postprocessing span)."""

    name = ""

    def __init__(self, export: dict):
        self.skeleton, self.input_names = export["skeleton"], export["input_names"]
        self.graph_inputs: list[str] = []  # what the graph reads: the exporter drops an input it never uses
        self.info: dict = {}

    def input_tensors(self, inputs: Any) -> dict[str, torch.Tensor]:
        tensors = dict(zip(self.input_names, input_leaves(inputs)[1]))
        return {name: tensors[name].detach().contiguous() for name in self.graph_inputs}

    def feed(self, inputs: Any) -> Any:
        return {name: tensor.cpu().numpy() for name, tensor in self.input_tensors(inputs).items()}

    def fed_shape(self, fed: Any) -> list[int]:
        return list(next(iter(fed.values())).shape)

    def run(self, fed: Any) -> list[Any]:
        raise NotImplementedError

    def unpack(self, arrays: list[Any]) -> Any:
        return rebuild_outputs(self.skeleton, [torch.from_numpy(a) for a in arrays])


class OnnxRuntimeForward(RuntimeForward):
    """ONNX Runtime with every graph optimisation: on the CPU its CPU provider with --threads
    intra-op threads; on CUDA the CUDA provider (tensorrt: TensorRT's, engines cached). Inputs and
    outputs are bound where the row runs (IO binding, DLPack both ways): no host copy in the forward."""

    def __init__(self, export: dict, threads: int, device: torch.device, engine_dir: Path | None,
                 backend: str = "onnxruntime"):
        import onnxruntime as ort

        super().__init__(export)
        self.name, self.ort, self.device = backend, ort, device
        settings = ort.SessionOptions()
        settings.intra_op_num_threads = threads
        settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        settings.log_severity_level = 3  # errors only: its warnings are not ASCII console lines of ours
        placement_known = hasattr(ort.InferenceSession, "get_provider_graph_assignment_info")
        if placement_known:
            settings.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        providers = ort_providers(backend, device, engine_dir)
        if backend == "tensorrt":
            import tensorrt  # noqa: F401 - loads its libraries (a pip install puts them off the loader's path)
        # No fallback: a provider that fails to be created raises its own error instead of a CPU session.
        self.session = ort.InferenceSession(export["path"], settings, providers=providers, enable_fallback=0)
        if problem := provider_fallback_problem(providers[0][0], self.session.get_providers()):
            raise BenchError(problem)
        self.graph_inputs = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.binding_device = ("cuda", device.index) if device.type == "cuda" else ("cpu", 0)
        placement = node_placement([(g.ep_name, [n.op_type for n in g.get_nodes()])
                                    for g in self.session.get_provider_graph_assignment_info()],
                                   providers[0][0]) if placement_known else {
            "runtime_nodes_by_provider": None, "runtime_cpu_nodes": None, "runtime_cpu_node_ops": None}
        self.info = {"runtime_version": ort.__version__, "runtime_device": str(device).upper(), **placement,
                     "runtime_settings": {"providers": self.session.get_providers(), "intra_op_threads": threads,
                                          "graph_optimization": "ORT_ENABLE_ALL", "io_binding": ":".join(map(str, self.binding_device)),
                                          **({"engine_cache": str(engine_dir)} if backend == "tensorrt" else {})}}

    def feed(self, inputs: Any) -> BoundInputs:
        tensors = self.input_tensors(inputs)
        binding = self.session.io_binding()
        for name, tensor in tensors.items():
            binding.bind_ortvalue_input(name, self.ort.OrtValue.from_dlpack(tensor))  # shares the tensor's memory
        for name in dict.fromkeys(self.output_names):  # a tensor the model returns twice is one graph output, bound once
            binding.bind_output(name, *self.binding_device)  # ONNX Runtime allocates it there
        sync(self.device)  # torch wrote the inputs on its stream; ONNX Runtime reads them on its own
        return BoundInputs(binding, tensors)

    def fed_shape(self, fed: BoundInputs) -> list[int]:
        return list(next(iter(fed.tensors.values())).shape)

    def run(self, fed: BoundInputs) -> list[Any]:
        self.session.run_with_iobinding(fed.binding)
        fed.binding.synchronize_outputs()  # run() synchronises at its end by default: said here, not assumed
        return fed.binding.get_outputs()  # one per bound name, in binding order

    def unpack(self, values: list[Any]) -> Any:
        by_name = {name: torch.from_dlpack(v) for name, v in zip(dict.fromkeys(self.output_names), values)}  # no copy
        return rebuild_outputs(self.skeleton, [by_name[name] for name in self.output_names])


class OpenVinoForward(RuntimeForward):
    """OpenVINO compiled for its CPU device: --threads, the latency hint, float32 inference."""

    name = "openvino"

    def __init__(self, export: dict, threads: int, device: torch.device, engine_dir: Path | None):
        import openvino as ov

        super().__init__(export)
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}  # else bf16 where the CPU has it: not this row's dtype
        self.compiled = ov.Core().compile_model(export["path"], "CPU", config)
        self.request = self.compiled.create_infer_request()
        # a port has every name of its tensor (a cast's output name too): keep the exported input's
        self.graph_inputs = [next(n for n in self.input_names if n in port.get_names()) for port in self.compiled.inputs]
        self.info = {"runtime_version": ov.get_version(), "runtime_device": "CPU",
                     "runtime_settings": {k: openvino_text(self.compiled.get_property(k)) for k in config}}

    def run(self, fed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer(fed)
        return [self.request.get_output_tensor(i).data for i in range(len(self.compiled.outputs))]

    def unpack(self, arrays: list[np.ndarray]) -> Any:
        return super().unpack([a.copy() for a in arrays])  # the request's buffers: the next infer() overwrites them


def openvino_text(value: Any) -> str:
    """A compiled model's property as OpenVINO spells it in a config ('f32', 'LATENCY', '2')."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


RUNTIMES: dict[str, Callable[..., RuntimeForward]] = {
    "onnxruntime": OnnxRuntimeForward, "openvino": OpenVinoForward,
    "tensorrt": functools.partial(OnnxRuntimeForward, backend="tensorrt")}


# --------------------------------------------------------------------------------------
# Accuracy cost
# --------------------------------------------------------------------------------------

# Verdict thresholds, one set per kind of variant. "fp32": --fuse, --channels-last, --compile
# reorder or merge float32 arithmetic, so only rounding-level error is ok; "reduced": --dtype
# bf16/fp16 round every product to 8 (bf16) or 11 (fp16) mantissa bits. Chosen from the figures of
# `python tests/perf/parity.py` on this project's CPU (YOLO11n, DA-V2 Small, MobileSAM, random
# weights): fp32 variants reached a worst relative L2 error of 9.2e-5 (MobileSAM under --compile),
# bf16 1.1e-2 to 1.5e-2 on YOLO11n and DA-V2 Small; each limit leaves 3x to 10x room above those.
# A layer "drifts" above the same relative error as the row. Task agreement (detection F1, depth delta<1.25, mask IoU)
# below PARITY_BROKEN_AGREEMENT, or a non-finite value, is broken whatever the set.
PARITY_THRESHOLDS = {
    "fp32": {"rel_l2": 1e-3, "agreement": 0.99},
    "reduced": {"rel_l2": 5e-2, "agreement": 0.90},
}
PARITY_BROKEN_AGREEMENT = 0.5
PARITY_MATCH_IOU = 0.5        # a variant's box matches a reference box of its class at IoU >= 0.5
PARITY_DELTA_RATIO = 1.25     # depth: a pixel agrees when max(v/r, r/v) < 1.25
PARITY_GROWTH_FLOOR = 1e-7    # an input error below float32 rounding counts as this much
PARITY_CHUNK_ELEMENTS = 1 << 20  # layer outputs spill and compare 4 MB at a time
PARITY_GROWTH_TOP = 5


def parity_threshold_set(options: RunOptions, device_type: str = "cpu") -> str:
    """Which PARITY_THRESHOLDS set judges a variant: reduced precision, or float32 rearranged. A
    runtime on CUDA runs its float32 convolutions and matrix products as TF32 (runtime_tf32), whose
    10-bit mantissa is fp16's: the reduced set."""
    reduced = options.dtype != "fp32" or bool(runtime_tf32(options.backend, device_type))
    return "reduced" if reduced else "fp32"


def changes_numerics(options: RunOptions) -> bool:
    """True when the options can change what the model computes (--threads cannot)."""
    return (options.dtype != "fp32" or options.fuse or options.channels_last or bool(options.compile)
            or options.backend != "torch")


def output_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a model's outputs, in a fixed order (dict fields, then tuple items)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in output_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in output_tensors(v)]
    return []


def relative_error(err_norm: float, ref_norm: float) -> float:
    """||v - r|| / ||r||: 0 where both are 0, infinite where only the reference is 0."""
    return err_norm / ref_norm if ref_norm > 0 else (0.0 if err_norm == 0 else math.inf)


def tensor_parity(variant: torch.Tensor, reference: torch.Tensor) -> dict:
    """Max abs error, relative L2 error ||v - r|| / ||r|| and non-finite values of one output."""
    v, r = variant.detach().double().cpu(), reference.detach().double().cpu()
    figures = {"shape": list(reference.shape),
               "nonfinite": int((~torch.isfinite(v)).sum()), "exact": bool(torch.equal(variant.cpu(), reference.cpu()))}
    if v.shape != r.shape:
        return {**figures, "max_abs": math.inf, "rel_l2": math.inf, "note": f"shape {list(v.shape)} != {list(r.shape)}"}
    diff = torch.nan_to_num(v - r, nan=math.inf)
    norm, err = float(r.norm()), float(diff.norm())
    figures["max_abs"] = float(diff.abs().max()) if diff.numel() else 0.0
    figures["rel_l2"] = relative_error(err, norm)
    return figures


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4 xyxy) with every box in b (M, 4)."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_detections(variant: dict, reference: dict) -> list[tuple[int, int, float]]:
    """(variant index, reference index, IoU) pairs as detection metrics match: variant boxes by
    falling confidence, each to the unmatched reference box of its class with the highest IoU >= 0.5."""
    ious = box_iou_matrix(variant["boxes"], reference["boxes"]) if len(variant["boxes"]) and len(reference["boxes"]) else None
    pairs, taken = [], set()
    for i in np.argsort(-variant["scores"], kind="stable") if ious is not None else []:
        best, best_iou = None, PARITY_MATCH_IOU
        for j in range(len(reference["boxes"])):
            if j not in taken and reference["classes"][j] == variant["classes"][i] and ious[i, j] >= best_iou:
                best, best_iou = j, ious[i, j]
        if best is not None:
            taken.add(best)
            pairs.append((int(i), best, float(best_iou)))
    return pairs


def mask_iou(a: np.ndarray, b: np.ndarray) -> float | None:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else None


def detection_parity(variant: dict, reference: dict, task: str) -> dict:
    """Agreement of the variant's detections with the reference's: precision, recall, F1, mean IoU
    and confidence difference of matched boxes; segment: mask IoU; pose: keypoint distance."""
    if not len(variant["boxes"]) and not len(reference["boxes"]):
        return {"agreement": None, "note": "n/a (no detections)"}
    pairs = match_detections(variant, reference)
    precision = len(pairs) / len(variant["boxes"]) if len(variant["boxes"]) else 0.0
    recall = len(pairs) / len(reference["boxes"]) if len(reference["boxes"]) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {"precision": precision, "recall": recall, "f1": f1, "detections": len(variant["boxes"]),
           "reference_detections": len(reference["boxes"]),
           "box_iou_mean": float(np.mean([p[2] for p in pairs])) if pairs else None,
           "confidence_diff_max": max((abs(float(variant["scores"][i] - reference["scores"][j])) for i, j, _ in pairs),
                                      default=None)}
    agreement = f1
    if task == "segment":
        ious = [mask_iou(variant["masks"][i], reference["masks"][j]) for i, j, _ in pairs]
        out["mask_iou_mean"] = float(np.mean([x for x in ious if x is not None])) if any(x is not None for x in ious) else None
        agreement = min(f1, out["mask_iou_mean"]) if out["mask_iou_mean"] is not None else f1
    if task == "pose":
        dist = [float(np.linalg.norm(variant["keypoints"][i][:, :2] - reference["keypoints"][j][:, :2], axis=1).mean())
                for i, j, _ in pairs]
        diag = [float(np.linalg.norm(reference["boxes"][j][2:] - reference["boxes"][j][:2])) for _, j, _ in pairs]
        out["keypoint_dist_px"] = float(np.mean(dist)) if dist else None
        out["keypoint_dist_rel"] = float(np.mean([d / g for d, g in zip(dist, diag) if g > 0])) if dist else None
    return {**out, "agreement": agreement}


def depth_parity(variant: dict, reference: dict) -> dict:
    """AbsRel of the variant's depth against the reference's, the fraction of pixels within a
    ratio of 1.25 (the agreement), and DepthPro's field-of-view difference in degrees."""
    v, r = variant["depth"].astype(np.float64), reference["depth"].astype(np.float64)
    valid = np.isfinite(r) & (r > 0)
    if not valid.any():
        return {"agreement": None, "note": "n/a (no positive reference depth)"}
    v, r = v[valid], r[valid]
    with np.errstate(divide="ignore", invalid="ignore"):
        within = (v > 0) & (np.maximum(v / r, r / v) < PARITY_DELTA_RATIO)
    out = {"abs_rel": float(np.mean(np.abs(v - r) / r)), "delta_1_25": float(within.mean())}
    if reference.get("fov_deg") is not None and variant.get("fov_deg") is not None:
        out["fov_diff_deg"] = abs(float(variant["fov_deg"]) - float(reference["fov_deg"]))
    return {**out, "agreement": out["delta_1_25"]}


def task_parity(task: str, variant: dict, reference: dict) -> dict:
    """A model's task figures: detections (detect/segment/pose), depth, or a prompted mask."""
    if task in ("detect", "segment", "pose"):
        return detection_parity(variant, reference, task)
    if task == "depth":
        return depth_parity(variant, reference)
    iou = mask_iou(variant["mask"], reference["mask"])
    return {"mask_iou": iou, "agreement": iou, **({} if iou is not None else {"note": "n/a (both masks empty)"})}


def parity_verdict(threshold_set: str, rel_l2_max: float, nonfinite: bool, agreement: float | None, exact: bool) -> str:
    """exact (bitwise equal), ok, drift or broken (non-finite values, or task agreement below 0.5)."""
    if nonfinite or (agreement is not None and agreement < PARITY_BROKEN_AGREEMENT):
        return "broken"
    if exact:
        return "exact"
    limits = PARITY_THRESHOLDS[threshold_set]
    if rel_l2_max <= limits["rel_l2"] and (agreement is None or agreement >= limits["agreement"]):
        return "ok"
    return "drift"


def image_parity(image: str, task: str, variant: tuple[list[torch.Tensor], dict],
                 reference: tuple[list[torch.Tensor], dict]) -> dict:
    """One image's figures: per raw output tensor, then the task's."""
    (v_raw, v_task), (r_raw, r_task) = variant, reference
    outputs = [tensor_parity(v, r) for v, r in zip(v_raw, r_raw)]
    if len(v_raw) != len(r_raw):
        outputs.append({"note": f"{len(v_raw)} output tensors against {len(r_raw)}", "rel_l2": math.inf,
                        "max_abs": math.inf, "nonfinite": 0, "exact": False})
    return {"image": image, "outputs": outputs, "task": task_parity(task, v_task, r_task),
            "rel_l2_max": max((o["rel_l2"] for o in outputs), default=0.0),
            "max_abs": max((o["max_abs"] for o in outputs), default=0.0),
            "nonfinite": any(o["nonfinite"] for o in outputs), "exact": all(o["exact"] for o in outputs)}


def parity_summary(threshold_set: str, images: list[dict]) -> dict:
    """The row's figures: the worst image (largest relative error, lowest task agreement)."""
    agreements = [i["task"]["agreement"] for i in images if i["task"].get("agreement") is not None]
    worst_task = min((i for i in images if i["task"].get("agreement") is not None),
                     key=lambda i: i["task"]["agreement"], default=images[0])
    summary = {"parity_thresholds": threshold_set,
               "parity_rel_l2_max": max(i["rel_l2_max"] for i in images),
               "parity_max_abs": max(i["max_abs"] for i in images),
               "parity_nonfinite": any(i["nonfinite"] for i in images),
               "parity_agreement": min(agreements) if agreements else None,
               "parity_task": worst_task["task"],
               "parity_note": None if agreements else worst_task["task"].get("note")}
    summary["parity"] = parity_verdict(threshold_set, summary["parity_rel_l2_max"], summary["parity_nonfinite"],
                                       summary["parity_agreement"], all(i["exact"] for i in images))
    return summary


def parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def parity_pairs(reference_layers: list[tuple[str, int, str]], variant_names: set[str]) -> dict:
    """What each variant output is compared with: (name, call) -> (reference output key,
    reference input key, note). Same module and call, except where --fuse folded a BatchNorm into
    the convolution before it: the fused convolution's output against the unfused BatchNorm's."""
    pairs: dict[tuple[str, int], tuple[tuple[str, int], tuple[str, int], str | None]] = {}
    for i, (name, call, kind) in enumerate(reference_layers):
        if name in variant_names:
            pairs.setdefault((name, call), ((name, call), (name, call), None))
        elif kind.startswith("BatchNorm") and i:
            conv, conv_call, _ = reference_layers[i - 1]
            if conv in variant_names and parent_name(conv) == parent_name(name):
                pairs[(conv, conv_call)] = ((name, call), (conv, conv_call), f"fused: against the unfused {name}")
    return pairs


def first_drift(layers: list[dict], limit: float) -> dict | None:
    """The first compared output, in execution order, whose relative error passes the limit."""
    return next((layer for layer in layers if (layer["rel_err"] or 0) > limit), None)


def error_growth(layers: list[dict], top: int = PARITY_GROWTH_TOP) -> list[dict]:
    """The layers where the error grows most: output error over input error (an input error
    below float32 rounding counts as PARITY_GROWTH_FLOOR)."""
    grown = [{**layer, "growth": layer["rel_err"] / max(layer["in_rel_err"] or 0.0, PARITY_GROWTH_FLOOR)}
             for layer in layers if layer["rel_err"] is not None and layer["in_rel_err"] is not None]
    return sorted(grown, key=lambda layer: -layer["growth"])[:top]


class LayerSpill:
    """The reference's layer outputs (and each layer's first input) in a temporary file, written
    and compared PARITY_CHUNK_ELEMENTS at a time as float32: neither capture is ever whole in
    memory (DepthPro's layer outputs pass 1 GB). An input that is an earlier layer's output (the
    same tensor object, not changed in place since: same version counter) is stored once. The
    file is deleted when closed."""

    def __init__(self, folder: Path | None = None):
        self._file = tempfile.TemporaryFile(prefix="vision-bench-parity-", dir=folder)
        self._fd = self._file.fileno()
        self._offset = 0
        self._stored: dict[int, tuple[Any, int, tuple[int, list[int]]]] = {}  # id -> (weakref, version, place)
        self._buffer = np.empty(PARITY_CHUNK_ELEMENTS, dtype=np.float32)
        self.index: dict[tuple[str, str, int], tuple[int, list[int]]] = {}  # (kind, name, call) -> (offset, shape)
        self.order: list[tuple[str, int, str]] = []  # (name, call, type) in execution order

    def close(self) -> None:
        self._file.close()
        self._stored.clear()

    def write(self, key: tuple[str, str, int], tensor: torch.Tensor) -> None:
        known = self._stored.get(id(tensor))
        if known and known[0]() is tensor and known[1] == tensor._version:  # an earlier output passed on
            self.index[key] = known[2]
            return
        self.index[key] = place = (self._offset, list(tensor.shape))
        self._stored[id(tensor)] = (weakref.ref(tensor), tensor._version, place)
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), PARITY_CHUNK_ELEMENTS):
            view = memoryview(np.ascontiguousarray(flat[start:start + PARITY_CHUNK_ELEMENTS].float().cpu().numpy())).cast("B")
            while view:  # pwrite may write less than asked
                written = os.pwrite(self._fd, view, self._offset)
                self._offset, view = self._offset + written, view[written:]

    @property
    def bytes_written(self) -> int:
        return self._offset

    def rel_err(self, key: tuple[str, str, int], tensor: torch.Tensor) -> tuple[float | None, bool]:
        """(||tensor - stored|| / ||stored||, any non-finite value in tensor); None where shapes differ."""
        offset, shape = self.index[key]
        if list(tensor.shape) != shape:
            return None, False
        flat, err, norm = tensor.detach().reshape(-1), 0.0, 0.0
        for start in range(0, flat.numel(), PARITY_CHUNK_ELEMENTS):
            v = flat[start:start + PARITY_CHUNK_ELEMENTS].float().cpu()
            r = torch.from_numpy(self._buffer[:v.numel()])
            if os.preadv(self._fd, [memoryview(r.numpy()).cast("B")], offset + start * 4) != v.numel() * 4:
                raise OSError(f"the parity spill file ended early at {offset + start * 4} bytes")
            d = v - r
            err, norm = err + float(torch.dot(d, d)), norm + float(torch.dot(r, r))
        if not math.isfinite(err):
            return math.inf, True
        return relative_error(math.sqrt(err), math.sqrt(norm)), False


def hook_leaves(model: torch.nn.Module, on_input: Callable[[str, int, torch.nn.Module, Any], None],
                on_output: Callable[[str, int, torch.nn.Module, Any], None]) -> list:
    """Hooks on every leaf: on_input(name, call, module, inputs) before it runs (an in-place
    activation overwrites its input), on_output(name, call, module, output) after."""
    handles = []
    for name, module in leaf_modules(model):
        calls = [0]

        def before(module, inputs, name=name, calls=calls):
            calls[0] += 1
            on_input(name, calls[0], module, inputs)

        def after(module, inputs, output, name=name, calls=calls):
            on_output(name, calls[0], module, output)

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    return handles


def hooked_forward(bench: ModelBenchmark, image: Image.Image, on_input=None, on_output=None) -> None:
    """One eager forward of bench on image with hooks on every leaf (autocast to --dtype). Under
    no_grad, not inference_mode: LayerSpill needs tensors' version counters."""
    inputs = bench.prepare(image)
    nothing = lambda *call: None  # noqa: E731
    handles = hook_leaves(bench.model, on_input or nothing, on_output or nothing)
    try:
        with torch.no_grad():
            bench.run_forward(inputs, eager=True)
    finally:
        for handle in handles:
            handle.remove()


def spill_reference_layers(reference: ModelBenchmark, image: Image.Image, folder: Path | None = None) -> LayerSpill:
    """The reference's every leaf output and first input on image, written to a LayerSpill."""
    spill = LayerSpill(folder)

    def store(kind: str, name: str, call: int, value: Any) -> None:
        tensor, _ = first_tensor(value)
        if tensor is not None and tensor.is_floating_point():
            spill.write((kind, name, call), tensor)

    def on_input(name, call, module, inputs):
        spill.order.append((name, call, type(module).__name__))
        store("in", name, call, inputs)

    hooked_forward(reference, image, on_input, lambda name, call, module, output: store("out", name, call, output))
    return spill


def compare_layers(variant: ModelBenchmark, image: Image.Image, spill: LayerSpill) -> list[dict]:
    """The variant's every leaf output on image against the spilled reference, in execution order."""
    pairs = parity_pairs(spill.order, {name for name, _ in leaf_modules(variant.model)})
    layers: list[dict] = []

    def against(kind: str, key: tuple[str, int] | None, value: Any) -> tuple[float | None, bool]:
        tensor, _ = first_tensor(value)
        if key is None or tensor is None or (kind, *key) not in spill.index:
            return None, False
        return spill.rel_err((kind, *key), tensor)

    def on_input(name, call, module, inputs):
        out_key, in_key, note = pairs.get((name, call), (None, None, "no reference output"))
        layers.append({"name": name, "call": call, "type": type(module).__name__, "rel_err": None,
                       "in_rel_err": against("in", in_key, inputs)[0], "nonfinite": False, "note": note,
                       "_out_key": out_key})

    def on_output(name, call, module, output):
        layer = next(layer for layer in reversed(layers) if (layer["name"], layer["call"]) == (name, call))
        layer["rel_err"], layer["nonfinite"] = against("out", layer.pop("_out_key"), output)

    hooked_forward(variant, image, on_input, on_output)
    return layers


def layer_parity(reference: ModelBenchmark, variant: ModelBenchmark, image: Image.Image, threshold_set: str,
                 plain_peak_mb: float, folder: Path | None = None) -> dict:
    """The first layer that drifts and where the error grows most, from a hooked eager forward
    of the reference and of the variant on one image; the peak RSS it took beyond plain_peak_mb,
    the peak of a plain forward of either on that image (parity_layers_extra_rss_mb: the captures' own cost)."""
    start = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as peak:
        spill = spill_reference_layers(reference, image, folder)
        try:
            largest_mb = to_mb(max((shape_bytes(shape) for key, (_, shape) in spill.index.items() if key[0] == "out"),
                                   default=0))
            layers = compare_layers(variant, image, spill)
        finally:
            spill.close()
    limit = PARITY_THRESHOLDS[threshold_set]["rel_l2"]
    drift = first_drift(layers, limit)
    return {"parity_layers": layers, "parity_first_drift": drift and {k: drift[k] for k in ("name", "call", "type", "rel_err")},
            "parity_growth_top": [{k: g[k] for k in ("name", "call", "type", "rel_err", "in_rel_err", "growth")}
                                  for g in error_growth(layers)],
            "parity_layers_compared": sum(layer["rel_err"] is not None for layer in layers),
            "parity_layer_limit": limit, "parity_layers_extra_rss_mb": peak.rss_peak_mb - plain_peak_mb,
            "parity_largest_output_mb": largest_mb, "parity_spill_mb": to_mb(spill.bytes_written),
            "parity_layers_sec": time.perf_counter() - start}


def shape_bytes(shape: list[int]) -> int:
    """Bytes of a float32 tensor of this shape."""
    return 4 * math.prod(shape)


def parity_outputs(bench: ModelBenchmark, image: Image.Image) -> tuple[list[torch.Tensor], dict]:
    """One untimed run as deployed: raw output tensors (float32 copies on the CPU) and the task result.
    The inputs are prepared outside inference mode, as infer() prepares them: an inference tensor
    fails a compiled forward's guards, and the whole model would compile again (a minute on a CPU)."""
    inputs = bench.feed(image)
    with torch.inference_mode():
        outputs = bench.model_outputs(bench.run_forward(inputs))
        raw = [t.detach().float().cpu().clone() for t in output_tensors(outputs)]
        return raw, bench.task_result(bench.postprocess(outputs, image), image)


def outputs_with_peak(bench: ModelBenchmark, images: list[tuple[str, Image.Image]]) -> tuple[list, float]:
    """parity_outputs on every image, and the peak RSS of the first image's (the one the layers are compared on)."""
    with PeakMemory(torch.device("cpu")) as peak:
        first = parity_outputs(bench, images[0][1])
    return [first] + [parity_outputs(bench, image) for _, image in images[1:]], peak.rss_peak_mb


def check_parity(bench: ModelBenchmark, images: list[tuple[str, Image.Image]], layers: bool) -> dict:
    """The variant's outputs against a fresh fp32 eager instance of the same model and weights,
    on every image (its time is reference_sec, never a sample); with layers, the first layer
    that drifts. A row without options that change the numerics is the reference itself."""
    if not changes_numerics(bench.options):
        return {"parity": "reference"}
    threshold_set = parity_threshold_set(bench.options, bench.device.type)
    start = time.perf_counter()
    reference = type(bench)(bench.device, bench.weights, bench.models_dir, bench.random_checkpoint,
                            RunOptions(threads=bench.options.threads))
    found = {}
    try:
        reference.load()
        expected, ref_peak_mb = outputs_with_peak(reference, images)
        reference_sec = time.perf_counter() - start
        compiled_before = bench.recompilations()
        got, variant_peak_mb = outputs_with_peak(bench, images)  # beside the reference, as the layer pass runs
        if compiled_before is not None:  # the variant's outputs must come from the graphs that were timed
            found["parity_recompilations"] = bench.recompilations() - compiled_before
        if layers and bench.runtime:
            found["parity_layer_note"] = f"n/a: {bench.runtime.name} runs the exported graph, which has no per-layer outputs"
        elif layers and bench.options.compile:
            found["parity_layer_note"] = "n/a: --compile runs compiled graphs, which have no per-layer outputs"
        elif layers:
            try:
                found |= layer_parity(reference, bench, images[0][1], threshold_set, max(ref_peak_mb, variant_peak_mb))
            except Exception as e:  # the outputs' figures stand without it
                if is_out_of_memory(e):
                    raise
                found["parity_layer_note"] = f"n/a: the layer comparison failed ({type(e).__name__}: {e})"
    finally:
        reference.cleanup()
        del reference
    per_image = [image_parity(name, bench.PARITY_TASK, mine, ref) for (name, _), mine, ref in zip(images, got, expected)]
    return json_safe({**parity_summary(threshold_set, per_image), "reference_sec": reference_sec,
                      "parity_per_image": per_image, **found})


def json_safe(value: Any) -> Any:
    """Non-finite floats (an infinite relative error) as None, anywhere in a structure: JSON has no Inf."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------
# One model's benchmark: its phases, in a worker process or (--isolation none) in this one
# --------------------------------------------------------------------------------------

FAILED_STATUSES = ("failed", "crashed", "timed_out")


@dataclass
class WorkerJob:
    """Everything one model's benchmark needs, as JSON, so a fresh worker process can read it."""

    class_name: str
    device: str
    weights: str
    models_dir: str
    images: list[str]
    runs: int
    dissect: bool
    dissect_mode: str
    viz_dir: str
    dissect_filter: str | None = None
    dissect_max_mb: float | None = None
    random_checkpoint: str | None = None
    options: dict = field(default_factory=dict)  # RunOptions as a dict
    parity_layers: bool = False  # --parity-layers (a variant with dissect compares its layers anyway)
    eta: dict = field(default_factory=dict)  # expected_sec, after_sec, launched_at (time.time()); {}: no estimate
    notes: list[str] = field(default_factory=list)  # said in the row (options left out of this backend's row)

    @property
    def model_class(self) -> type[ModelBenchmark]:
        return next(c for c in MODEL_REGISTRY if c.__name__ == self.class_name)

    @property
    def backend(self) -> str:
        return self.options.get("backend", "torch")


class ModelProgress:
    """Where a model's benchmark is (phase, image) and its latest peak RSS. A worker sends each
    change to the runner, so a worker that dies can still be placed."""

    def __init__(self, send: Callable[[dict], None] | None = None):
        self.phase: str | None = None
        self.image: str | None = None
        self.rss_peak_mb: float | None = None
        self._send = send

    def update(self, **fields) -> None:
        for key, value in fields.items():
            setattr(self, key, value)
        if self._send:
            self._send({"type": "progress", "phase": self.phase, "image": self.image, "rss_peak_mb": self.rss_peak_mb})

    def where(self) -> str:
        return f"during {self.phase or 'start-up'}" + (f" on image {self.image}" if self.image else "")


def memory_label(device: torch.device) -> str:
    return "GPU Memory" if device.type == "cuda" else "RSS"


def snapshot_fields(label: str, snap: dict[str, float | None]) -> dict[str, float | None]:
    return {
        f"rss_{label}_mb": snap["rss_mb"],
        f"cuda_allocated_{label}_mb": snap["cuda_allocated_mb"],
        f"cuda_reserved_{label}_mb": snap["cuda_reserved_mb"],
        f"gpu_process_{label}_mb": snap["gpu_process_mb"],
    }


def mb_delta(later: dict[str, float | None], earlier: dict[str, float | None], kind: str) -> float | None:
    """later's headline figure minus earlier's; None when either is unknown (NVML not there)."""
    a, b = headline_mb(later, kind), headline_mb(earlier, kind)
    return None if a is None or b is None else a - b


def timed_phase(progress: ModelProgress, phase: str, device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """Run one phase with the device synchronised on both sides: (seconds, result)."""
    progress.update(phase=phase, image=None)
    device = phase_clock_device(phase, device)
    start = clock(device)
    result = work()
    return clock(device) - start, result


def timed_runs(bench: ModelBenchmark, job: WorkerJob, progress: ModelProgress) -> list[dict]:
    """--runs inference runs per image, no warm-up: run 1 of each image is its cold run."""
    records, total = [], len(job.images) * job.runs
    for path in map(Path, job.images):
        progress.update(phase="inference", image=path.name)
        image = decode_image(path)
        for run in range(1, job.runs + 1):
            record = {"image": path.name, "run": run, **bench.infer(image)}
            records.append(record)
            progress.update(rss_peak_mb=max(filter(None, [progress.rss_peak_mb, record["peak_rss_mb"]]), default=None))
            log(f"[INFER {len(records)}/{total}] {path.name} | Time: {record['inference_sec']:.3f}s | "
                f"Peak Memory: {fmt(record['peak_mb'], '.0f')} MB | pre {record['preprocess_sec']:.3f}s "
                f"post {record['postprocess_sec']:.3f}s" + runs_time_left(job.eta, records, total), "")
    return records


def runs_time_left(eta: dict, records: list[dict], total: int) -> str:
    """' | left: ...' for an INFER line (nothing when the runner gave no estimate, as on Ray)."""
    if not eta:
        return ""
    warm = [r for r in records if r["run"] > 1] or records  # the cold run's pace is not the pace of the rest
    run_sec_mean = float(np.mean([r["preprocess_sec"] + r["inference_sec"] + r["postprocess_sec"] for r in warm]))
    left = model_time_left(time.time() - eta["launched_at"], eta["expected_sec"], len(records), total, run_sec_mean)
    return " | " + time_left_text(left, eta["after_sec"], eta["source"])


LAYER_BROWSER_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 13px sans-serif; margin: 1em; }
#bar { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; } td, th { border-bottom: 1px solid #eee; padding: 3px 6px; vertical-align: top; }
th { text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 360px; image-rendering: pixelated; }
</style></head>
<body>
<div id="bar"><b>__TITLE__</b> &middot; <span id="count"></span>
 &middot; filter (module or type): <input id="filter" size="30">
 &middot; sort: <select id="sort"><option value="index">execution order</option>
 <option value="time">forward time</option><option value="parity">parity error</option></select></div>
<table><thead><tr><th>#</th><th>picture</th><th>module</th><th>type</th><th>call</th><th>shape</th>
<th>min</th><th>max</th><th>mean</th><th>std</th><th>zeros</th><th>forward ms</th><th>parity rel err</th></tr></thead>
<tbody id="rows"></tbody></table>
<script type="application/json" id="layers">__LAYERS__</script>
<script>
"use strict";
const errors = [];
window.addEventListener("error", e => { errors.push(String(e.message)); document.body.dataset.jsErrors = errors.join("; "); });
const layers = JSON.parse(document.getElementById("layers").textContent);
const fmt = v => v === null || v === undefined ? "n/a" : (typeof v === "number" ? Number(v.toPrecision(4)).toString() : String(v));
function cell(row, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; row.appendChild(td); }
function render() {
  const query = document.getElementById("filter").value.toLowerCase();
  const shown = layers.filter(l => !query || l.name.toLowerCase().includes(query) || l.type.toLowerCase().includes(query));
  const order = document.getElementById("sort").value;
  if (order === "time") shown.sort((a, b) => (b.forward_ms || 0) - (a.forward_ms || 0));
  if (order === "parity") shown.sort((a, b) => (b.parity_rel_err ?? -1) - (a.parity_rel_err ?? -1));
  const body = document.getElementById("rows");
  body.replaceChildren();
  for (const l of shown) {
    const row = document.createElement("tr");
    row.className = "layer";
    cell(row, l.index, "num");
    const pic = document.createElement("td");
    const png = (l.files || []).find(f => f.endsWith(".png"));
    if (png) { const img = document.createElement("img"); img.src = png; img.loading = "eager"; img.alt = l.name; pic.appendChild(img); }
    else { pic.textContent = l.note || "-"; }
    row.appendChild(pic);
    cell(row, l.name); cell(row, l.type); cell(row, l.call, "num");
    cell(row, (l.shape || []).join("x"));
    for (const key of ["min", "max", "mean", "std", "sparsity", "forward_ms", "parity_rel_err"]) cell(row, fmt(l[key]), "num");
    body.appendChild(row);
  }
  document.getElementById("count").textContent = shown.length + " of " + layers.length + " outputs";
  document.body.dataset.shown = String(shown.length);
}
const start = new URLSearchParams(location.hash.slice(1));
document.getElementById("filter").value = start.get("filter") || "";
document.getElementById("sort").value = start.get("sort") || "index";
document.getElementById("filter").addEventListener("input", render);
document.getElementById("sort").addEventListener("change", render);
render();
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.body.dataset.images = String(imgs.length);
  document.body.dataset.imagesLoaded = String(imgs.filter(i => i.complete && i.naturalWidth > 0).length);
});
</script></body></html>
"""


def write_layer_browser(out_dir: Path, meta: dict) -> str:
    """viz/<ts>/<ClassName>/index.html: every output with its picture, statistics and time, in
    one static page (no server, no network, no library), filterable by module or type."""
    keys = ("index", "name", "type", "call", "shape", "min", "max", "mean", "std", "sparsity", "forward_ms",
            "parity_rel_err", "files", "note")
    layers = json.dumps([{k: layer.get(k) for k in keys} for layer in meta["layers"]]).replace("</", "<\\/")
    title = html.escape(f"{meta['model_name']} ({meta['class_name']}): {meta['total_outputs']} layer outputs "
                        f"on {meta['image']}")
    atomic_write_text(out_dir / "index.html", LAYER_BROWSER_HTML.replace("__TITLE__", title).replace("__LAYERS__", layers))
    return "index.html"


def parity_phase(bench: ModelBenchmark, job: WorkerJob, progress: ModelProgress) -> dict:
    """The accuracy cost of the row's options (check_parity), after the timed runs; logged."""
    if not changes_numerics(bench.options):
        return {"parity": "reference"}
    progress.update(phase="parity", image=None)
    layers = job.parity_layers or job.dissect
    try:
        found = check_parity(bench, [(Path(p).name, decode_image(Path(p))) for p in job.images], layers)
    except Exception as e:  # the timed figures stand without it
        message = f"{type(bench).__name__}: the accuracy check failed ({type(e).__name__}: {e}); the speed figures are kept"
        log(message, "WARNING")
        return {"parity": "failed", "parity_error": message}
    task = found["parity_note"] or f"task agreement {fmt(found['parity_agreement'], '.3f')}"
    log(f"Accuracy cost against fp32 eager ({found['parity_thresholds']} thresholds): {found['parity']}; worst "
        f"relative error {fmt(found['parity_rel_l2_max'], '.2e')}, max abs {fmt(found['parity_max_abs'], '.2e')}; {task} "
        f"(reference {found['reference_sec']:.2f}s, not a sample)", "PARITY")
    if found.get("parity_recompilations"):
        log(f"{type(bench).__name__}: the accuracy check compiled {found['parity_recompilations']} graph(s) the timed "
            f"runs did not use: its figures may not be those of the timed graphs", "WARNING")
    if layers and "parity_layers" in found:
        drift = found["parity_first_drift"]
        log(f"First layer above {found['parity_layer_limit']:.0e}: " + (f"{drift['name']} (call {drift['call']}, "
            f"{fmt(drift['rel_err'], '.2e')})" if drift else "none") + f"; {found['parity_layers_compared']} outputs compared "
            f"in {found['parity_layers_sec']:.2f}s, {found['parity_layers_extra_rss_mb']:.0f} MB beyond a plain forward", "PARITY")
    return found


def dissect_model(bench: ModelBenchmark, job: WorkerJob, progress: ModelProgress,
                  flops_per_call: dict[tuple[str, int], int] | None = None,
                  parity_per_call: dict[tuple[str, int], dict] | None = None) -> dict:
    """Dissect on the first image and write layers_metadata.json (with each call's FLOPs); returns the summary."""
    out_dir = Path(job.viz_dir) / type(bench).__name__
    first = Path(job.images[0])
    progress.update(phase="dissection", image=first.name)
    log(f"Starting layer dissection ({job.dissect_mode}) on {first.name}...", "DISSECT")
    summary = bench.dissect_layers(decode_image(first), out_dir, job.dissect_mode,
                                   limits=DissectLimits(job.dissect_filter, job.dissect_max_mb))
    for layer in summary["layers"]:
        layer["flops"] = (flops_per_call or {}).get((layer["name"], layer["call"]))
        if parity_per_call is not None:
            found = parity_per_call.get((layer["name"], layer["call"]), {})
            layer["parity_rel_err"] = json_safe(found.get("rel_err"))
            if found.get("note"):
                layer["parity_note"] = found["note"]
    meta = {"model_name": bench.MODEL_NAME, "class_name": type(bench).__name__, "image": first.name,
            "input_shape": bench.input_shape, **summary}
    atomic_write_text(out_dir / "layers_metadata.json", json.dumps(meta, indent=2))
    summary["browser"] = write_layer_browser(out_dir, meta)
    if summary["stopped"]:
        log(f"Dissection stopped after {summary['total_outputs']} layer outputs: {summary['stopped']}. "
            f"The model's latency and memory figures are kept", "WARNING")
    log(f"Saved {summary['total_outputs']} layer outputs ({summary['total_files']} files, "
        f"{format_bytes(summary['bytes_written'])}) in {summary['seconds']:.2f}s to {out_dir}/", "DISSECT")
    return summary


def options_fields(options: RunOptions) -> dict:
    """The options as run, for the row: threads as set, interop threads and the CPU affinity."""
    return {"runtime": options.backend, "dtype": options.dtype, "channels_last": options.channels_last,
            "compile_mode": options.compile,
            "fuse": options.fuse, "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu_affinity": usable_cpus(), "cudnn_benchmark": cuda_cudnn_benchmark()}


def model_compute(bench: ModelBenchmark, image: Image.Image, stats: dict, gpu: GpuMonitor, progress: ModelProgress) -> dict:
    """FLOPs (a separate eager pass), achieved TFLOP/s and MFU; on NVIDIA GPUs the energy window."""
    progress.update(phase="flops", image=None)
    flops, per_call, by_class, source = bench.count_flops(image)
    first = stats["per_image"][0]  # the FLOPs are this image's: its own warm median, not the pooled one
    figures = compute_figures(flops, by_class, first["warm_median_sec"], bench.device, bench.options.dtype,
                              runtime_tf32(bench.options.backend, bench.device.type))
    figures["flops_basis"] = (f"FLOPs of the first image ({first['image']}, input "
                              f"{'x'.join(map(str, first['input_shape'] or []))}) over its own warm median")
    figures["flops_source"] = source
    log(f"FLOPs per forward: {figures['gflops']:.2f} G ({'counted now' if source == 'counted' else 'from the cache'}); achieved {fmt(figures['achieved_tflops'], '.3f')} TFLOP/s; "
        f"MFU {fmt(figures['mfu'], '.1%') if figures['mfu'] is not None else 'n/a'}", "STATS")
    energy = {}
    if gpu.energy_mj() is not None:
        progress.update(phase="energy", image=None)
        inputs = bench.feed(image)

        def run_once():
            with torch.inference_mode():
                bench.run_forward(inputs)

        energy = energy_per_inference(gpu, run_once, bench.device)
        log(f"Energy: {energy['energy_j_per_inference']:.3f} J per inference, {energy['power_mean_w']:.0f} W mean "
            f"({energy['energy_runs']} runs; idle {energy['power_idle_w']:.0f} W)", "STATS")
    return {**figures, **(energy or {"energy_j_per_inference": None, "power_mean_w": None, "power_idle_w": None}),
            "power_limit_w": gpu.power_limit_w(), "nvml": gpu.status, "flops_per_call": per_call}


def runtime_phases(bench: ModelBenchmark, job: WorkerJob, image: Image.Image, progress: ModelProgress,
                   torch_load_sec: float) -> dict:
    """--backend: export the loaded module (its own phase, never a sample), then create the
    runtime's session: the row's load time (the PyTorch module's is torch_load_sec); tensorrt
    then builds its engines (engine_build)."""
    backend, models_dir = bench.options.backend, Path(job.models_dir)
    if backend == "torch":
        return {}
    export_sec, export = timed_phase(progress, "export", bench.device,
                                     lambda: export_onnx(bench, image, models_dir / EXPORTS_DIR_NAME))
    if export["note"]:
        log(f"{type(bench).__name__}: {export['note']}", "WARNING")
    if export["exporter_fallback"]:
        log(f"{type(bench).__name__}: {export['exporter_fallback']}", "EXPORT")
    log(f"ONNX export ({export['exporter']} exporter, opset {export['opset']}): {export['mb']:.1f} MB in {export_sec:.2f}s"
        f"{' (cached: ' + export['path'] + ')' if export['cached'] else ''}; not a latency sample", "EXPORT")
    threads = bench.options.threads or usable_cpus()
    engine_dir = engine_dir_for(bench.device, models_dir, export["path"]) if backend == "tensorrt" else None
    engines_before = folder_files(engine_dir)
    load_sec, bench.runtime = timed_phase(progress, "load", bench.device,
                                          lambda: RUNTIMES[backend](export, threads, bench.device, engine_dir))
    info = bench.runtime.info
    log(f"{backend} {info['runtime_version']} session created in {load_sec:.2f}s on {info['runtime_device']} "
        f"({info['runtime_settings']})", "LOAD")
    log_node_placement(type(bench).__name__, info)
    engine = engine_build(bench, job, progress, engine_dir, engines_before) if engine_dir else {}
    return {"torch_load_sec": torch_load_sec, "load_time_sec": load_sec, "export_sec": export_sec, "export_mb": export["mb"],
            "export_cached": export["cached"], "export_note": export["note"], "export_exporter": export["exporter"],
            "export_fallback": export["exporter_fallback"],
            "export_opset": export["opset"], "export_path": export["path"], **info, **engine,
            "dissect_note": f"on the PyTorch module: {backend} runs the exported graph, which has no per-layer outputs"}


def node_placement_text(info: dict) -> tuple[str | None, str | None]:
    """('363 on CPUExecutionProvider', '12 node(s) (Shape x8, Gather x4)' or None): where ONNX
    Runtime placed the graph's nodes and, on a GPU, those left on the CPU with their commonest ops."""
    placed = info.get("runtime_nodes_by_provider")
    if not placed:
        return None, None
    text = ", ".join(f"{count} on {provider}" for provider, count in placed.items())
    if not info.get("runtime_cpu_nodes"):
        return text, None
    ops = ", ".join(f"{op} x{n}" for op, n in list(info["runtime_cpu_node_ops"].items())[:6])
    return text, f"{info['runtime_cpu_nodes']} node(s) ({ops})"


def log_node_placement(name: str, info: dict) -> None:
    """Where ONNX Runtime placed the graph's nodes; a warning for nodes a GPU row runs on the CPU."""
    placed, on_cpu = node_placement_text(info)
    if placed:
        log(f"{name}: nodes placed: {placed}", "LOAD")
    if on_cpu:
        log(f"{name}: {on_cpu} run on the CPU though a GPU provider was asked for: their time, and the copies "
            f"to and from them, are in this row's figures", "WARNING")


def engine_dir_for(device: torch.device, models_dir: Path, export_path: str) -> Path:
    """The folder of an export's TensorRT engines on this GPU, made if absent."""
    import onnxruntime as ort

    facts = {"onnxruntime": ort.__version__, "tensorrt": package_version("tensorrt"),
             "gpu": cuda_device_name(device), "capability": cuda_capability(device)}
    folder = engine_folder(models_dir / ENGINES_DIR_NAME, export_path, facts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write TensorRT's engines under {folder.parent} ({e.strerror or e}): make it a "
                          f"writable folder, or pass --models-dir") from None
    return folder


def folder_files(folder: Path | None) -> dict[str, tuple[int, int]]:
    """The files under folder, by relative path, with their size and mtime in ns (none without a folder)."""
    if folder is None or not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def engine_build(bench: ModelBenchmark, job: WorkerJob, progress: ModelProgress, engine_dir: Path,
                 files_before: dict[str, tuple[int, int]]) -> dict:
    """tensorrt: one call per distinct input shape before the samples, since TensorRT builds an
    engine at a shape's first call (a fixed shape's at session creation, in the load time): minutes
    for a large model, never a sample; a cache hit reads the engines built before."""
    progress.update(phase="engine build", image=None)
    shapes: dict[tuple[tuple[int, ...], ...], Any] = {}
    for path in job.images:
        fed = bench.feed(decode_image(Path(path)))
        shapes.setdefault(tuple(tuple(t.shape) for t in fed.tensors.values()), fed)  # every input's shape
    start = clock(bench.device)
    with torch.inference_mode():
        for fed in shapes.values():
            bench.run_forward(fed)
    build_sec = clock(bench.device) - start
    cached = engine_cache_hit(files_before, folder_files(engine_dir))
    log(f"TensorRT engines for {len(shapes)} input shape(s) in {build_sec:.2f}s "
        f"({'read from the cache' if cached else 'built'}: {engine_dir}); not latency samples", "ENGINE")
    return {"engine_build_sec": build_sec, "engine_build_calls": len(shapes), "engine_cached": cached,
            "engine_dir": str(engine_dir)}


def benchmark_model(job: WorkerJob, progress: ModelProgress) -> dict:
    """One model, phases in order: imports, runtime init, download, load (local files only),
    then the cold run and the rest, dissection, cleanup. Returns its result row.

    Memory is measured against the baseline taken after runtime init. A global module-call
    counter runs through the load (up to the cold run, or to --compile's calls): any forward
    before it would show as a non-zero count.
    """
    cls, device = job.model_class, torch.device(job.device)
    label = memory_label(device)
    options = RunOptions(**job.options)
    options.check(device, BenchError)  # a Ray node without CUDA asked for fp16
    torch.set_num_threads(options.threads or usable_cpus())
    bench = cls(device, job.weights, Path(job.models_dir), job.random_checkpoint and Path(job.random_checkpoint), options)
    try:
        with ModuleCallCounter() as calls:
            # Nothing before runtime init touches CUDA (see phase_clock_device); NVML after it.
            import_sec, _ = timed_phase(progress, "import", device, bench.import_library)
            runtime_init_sec, _ = timed_phase(progress, "runtime init", device, lambda: runtime_init(device))
            log(f"Imports {import_sec:.2f}s, runtime init {runtime_init_sec:.3f}s (device {device})", "INIT")
            gpu = bench.gpu = GpuMonitor(device, match_by_memory=bench.mem_kind != "gpu_process_nvml")
            before = get_memory_usage(device, gpu)
            log(f"{label} baseline after runtime init: {fmt(headline_mb(before, bench.mem_kind), '.0f')} MB", "MEMORY")
            download_sec, downloaded = timed_phase(progress, "download", device, bench.download)
            if downloaded:
                log(f"Weights downloaded in {download_sec:.2f}s (not counted in the load time)", "LOAD")
            log(f"Loading model to {device} ({job.weights} weights, local files only)...", "LOAD")
            load_time_sec, _ = timed_phase(progress, "load", device, bench.load)
        # The counter's global hook ends here: dynamo guards on global module hooks, so a hook
        # present while compiling and gone in the runs would recompile every graph in the cold run.
        # --compile's calls before the cold run are its compile_calls, by design.
        log(f"Model loaded successfully in {load_time_sec:.2f}s from {bench.weight_source}", "LOAD")
        first_image = decode_image(Path(job.images[0]))
        backend = runtime_phases(bench, job, first_image, progress, load_time_sec)
        after_load = get_memory_usage(device, gpu)
        log(f"{label} after load: {fmt(headline_mb(after_load, bench.mem_kind), '.0f')} MB "
            f"(delta: +{fmt(mb_delta(after_load, before, bench.mem_kind), '.0f')} MB)", "MEMORY")
        compiled = {}
        if options.compile:
            images = [first_image] + [decode_image(Path(p)) for p in job.images[1:]]
            compiled = timed_phase(progress, "compile", device, lambda: bench.compile(images))[1]
            log(f"torch.compile ({options.compile}): {compiled['compile_calls']} call(s) over "
                f"{compiled['compile_shapes']} input shape(s) in {compiled['compile_sec']:.2f}s, "
                f"{compiled['compiled_graphs']} graph(s); not latency samples", "COMPILE")
        gpu_before = gpu.state()
        with HostActivity() as host:
            runs = timed_runs(bench, job, progress)
        gpu_after = gpu.state()
        stats = latency_stats(runs)
        noise = noise_reasons(stats["warm_iqr_rel"], host.other_cpu_cores)
        if gpu_before["other_gpu_pids"] or gpu_after["other_gpu_pids"]:
            others = sorted(set(gpu_before["other_gpu_pids"] or []) | set(gpu_after["other_gpu_pids"] or []))
            noise.append(f"other processes on the GPU: {others} (ours told apart by {gpu_after['own_process_by']})")
        compute = model_compute(bench, first_image, stats, gpu, progress)
        log(f"Inference: avg={stats['avg_inference_sec']:.3f}s std={stats['std_inference_sec']:.3f}s "
            f"min={stats['min_inference_sec']:.3f}s max={stats['max_inference_sec']:.3f}s "
            f"cold={stats['cold_inference_sec']:.3f}s warm median={fmt(stats['warm_median_sec'], '.3f')}"
            f"{'s' if stats['warm_median_sec'] is not None else ''} "
            f"({stats['warm_samples']} warm runs)", "STATS")
        log(f"FPS: avg={stats['fps_avg']:.3f} std={fmt(stats['fps_std'])}", "STATS")
        if noise:
            log(f"{cls.__name__} figures are noisy: {'; '.join(noise)}. Run again on a quiet machine", "WARNING")
        flops_per_call = compute.pop("flops_per_call")
        bench_recompilations = bench.recompilations()  # in the timed runs; the parity check's are its own figure
        parity = parity_phase(bench, job, progress)
        parity_layers = parity.pop("parity_layers", None)
        per_call = {(layer["name"], layer["call"]): layer for layer in parity_layers} if parity_layers else None
        dissection = dissect_model(bench, job, progress, flops_per_call, per_call) if job.dissect else None
        info = bench.get_info()
        info["notes"] += job.notes
        progress.update(phase="cleanup", image=None)  # on failure the phase stays where it failed
    finally:
        log("Clearing model and GPU cache...", "CLEANUP")
        bench.cleanup()
    after_cleanup = get_memory_usage(device, gpu)
    log(f"{label} after cleanup: {fmt(headline_mb(after_cleanup, bench.mem_kind), '.0f')} MB", "MEMORY")
    return {
        **info,
        "status": "ok",
        "import_sec": import_sec,
        "runtime_init_sec": runtime_init_sec,
        "download_sec": download_sec,
        "downloaded": downloaded,
        "load_time_sec": load_time_sec,
        "module_calls_before_cold_run": calls.count,
        **backend,
        **options_fields(options),
        "compile_sec": compiled.get("compile_sec"),
        "compile_calls": compiled.get("compile_calls"),
        "recompilations": bench_recompilations,
        "inference_times_sec": [r["inference_sec"] for r in runs],
        **stats,
        "warm_median_event_sec": median_or_none([r["inference_event_sec"] for r in runs
                                                 if r["run"] > 1 and r["inference_event_sec"] is not None]),
        **compute,
        **parity,
        "gpu_state_before": gpu_before,
        "gpu_state_after": gpu_after,
        "gpu_own_process": gpu_after["own_process_by"],
        "noisy": bool(noise),
        "noise_reasons": noise,
        "other_cpu_cores": host.other_cpu_cores,
        "load_avg_1min": host.load_avg_1min,
        "mem_kind": bench.mem_kind,
        "mem_before_mb": headline_mb(before, bench.mem_kind),
        "mem_after_load_mb": headline_mb(after_load, bench.mem_kind),
        "mem_peak_mb": (mem_peak_mb := max((r["peak_mb"] for r in runs if r["peak_mb"] is not None), default=None)),
        "mem_note": nvml_memory_note(bench.mem_kind, gpu.status, mem_peak_mb),
        "mem_after_cleanup_mb": headline_mb(after_cleanup, bench.mem_kind),
        "mem_not_returned_mb": mb_delta(after_cleanup, before, bench.mem_kind),
        **snapshot_fields("before", before),
        **snapshot_fields("after_load", after_load),
        **snapshot_fields("after_cleanup", after_cleanup),
        "rss_peak_mb": max((r["peak_rss_mb"] for r in runs if r["peak_rss_mb"] is not None), default=None),
        "cuda_peak_allocated_mb": max((r["peak_cuda_allocated_mb"] for r in runs
                                       if r["peak_cuda_allocated_mb"] is not None), default=None),
        "total_layers_dissected": dissection["total_outputs"] if dissection else 0,
        "dissect_mode": job.dissect_mode if dissection else None,
        "dissect_status": (f"stopped: {dissection['stopped']}" if dissection["stopped"] else "complete") if dissection else None,
        "dissect_time_sec": dissection["seconds"] if dissection else None,
        "dissect_bytes_written": dissection["bytes_written"] if dissection else None,
        "dissect_files": dissection["total_files"] if dissection else None,
        "dissect_top_layers": dissection["top_layers"] if dissection else None,
        "dissect_pictures_stopped": dissection["pictures_stopped"] if dissection else None,
        "layer_timing": dissection["layer_timing"] if dissection else None,
        "viz_dir": str(Path(job.viz_dir) / cls.__name__) if dissection else None,
        "num_images": len(job.images),
        "images": [Path(p).name for p in job.images],
        "num_runs_per_image": job.runs,
        "runs": runs,
    }


def failure_message(cls: type[ModelBenchmark], error: BaseException, progress: ModelProgress, device: torch.device) -> str:
    where = progress.where()
    if not is_out_of_memory(error):
        return f"Failed to benchmark {cls.__name__} {where}: {type(error).__name__}: {error}"
    snap = get_memory_usage(device)
    figures = f"process RSS {snap['rss_mb']:.0f} MB, peak RSS {format_bytes(rss_peak_bytes())}"
    if device.type == "cuda":
        figures += (f", CUDA allocated {snap['cuda_allocated_mb']:.0f} MB, reserved {snap['cuda_reserved_mb']:.0f} MB, "
                    f"peak allocated {cuda_peak_allocated_mb(device):.0f} MB")
    return (f"{cls.__name__} ran out of memory {where} ({figures}): {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}. Free memory, use a smaller model set, or --device cpu")


def status_row(cls: type[ModelBenchmark], status: str, reason: str, progress: ModelProgress | None = None,
               backend: str = "torch", **extra) -> dict:
    """The row of a model that did not finish: skipped, failed, crashed or timed_out."""
    progress = progress or ModelProgress()
    return {"model_name": cls.MODEL_NAME, "class_name": cls.__name__, "short_name": cls.SHORT_NAME,
            "input_size": cls.INPUT_SIZE, "runtime": backend, "status": status, "error": reason,
            "failed_phase": progress.phase, "failed_image": progress.image, **extra}


def row_backend(row: dict) -> str:
    """What ran a row's forward (rows from before --backend: torch)."""
    return row.get("runtime") or "torch"


def model_backend_name(row: dict) -> str:
    """A model with its backend when not torch: a row across machines (the merged report)."""
    backend = row_backend(row)
    return row["model_name"] + (f" [{backend}]" if backend != "torch" else "")


def row_name(row: dict) -> str:
    """A model as the report names it: with its backend when not torch, its node on a cluster."""
    return model_backend_name(row) + (f" @ {row['node_label']}" if row.get("node_label") else "")


def run_key(class_name: str, backend: str = "torch", node_label: str | None = None) -> str:
    """One row's identity within a run: its class, its backend (when not torch), and its node on
    Ray (every-node runs a class once per node). The journal, the recovery and the trend plots
    tell rows apart by it."""
    name = class_name if backend == "torch" else f"{class_name}:{backend}"
    return f"{name} @ {node_label}" if node_label else name


def row_key(row: dict) -> str:
    return run_key(row["class_name"], row_backend(row), row.get("node_label"))


def run_model(job: WorkerJob, progress: ModelProgress) -> dict:
    """benchmark_model with a failure turned into its row; interrupts propagate."""
    cls = job.model_class
    try:
        return benchmark_model(job, progress)
    except Exception as e:
        if isinstance(e, ModelUnavailable) and issubclass(cls, SKIPPABLE):
            log(f"Skipping {cls.__name__}: {e}", "SKIP")
            return status_row(cls, "skipped", str(e), backend=job.backend)
        message = failure_message(cls, e, progress, torch.device(job.device))
        log(message, "ERROR")
        if not isinstance(e, BenchError):
            traceback.print_exc()
        return status_row(cls, "failed", message, progress, job.backend)


def die_with_parent() -> None:
    """Linux: the kernel kills this worker when the runner dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(EXIT_SIGTERM)


def worker_main(job_path: Path, message_fd: int) -> int:
    """A worker process: one model's benchmark; progress and the row go to the runner as JSON lines."""
    die_with_parent()
    channel = os.fdopen(message_fd, "w", buffering=1, encoding="utf-8")

    def send(message: dict) -> None:
        channel.write(json.dumps(message, default=str) + "\n")
        channel.flush()

    job = WorkerJob(**json.loads(job_path.read_text(encoding="utf-8")))
    try:
        with termination_signals():
            row = run_model(job, ModelProgress(send))
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except RunInterrupted as e:
        return EXIT_SIGINT if e.signum == signal.SIGINT else EXIT_SIGTERM
    send({"type": "result", "row": row})
    return EXIT_MODEL_FAILED if row["status"] in FAILED_STATUSES else EXIT_OK


def build_random_main(class_name: str, path: Path) -> int:
    """A short-lived process: build a model's seeded random architecture and save it, so the
    builder's own forward (Ultralytics runs one) never warms the benchmarked process."""
    cls = next(c for c in MODEL_REGISTRY if c.__name__ == class_name)
    set_seed()
    cls(torch.device("cpu"), "random").write_random_checkpoint(path)
    return EXIT_OK


# --------------------------------------------------------------------------------------
# Progress journal: each finished model made durable before the next one starts
# --------------------------------------------------------------------------------------
# A run appends its header and then every finished row to results/journal_<ts>.jsonl, each
# entry fsync'd, and deletes the journal once its reports and history entry are written. A
# journal that is still there belongs to a run that died (SIGKILL, OOM killer, power loss):
# the next run in the folder, or --recover, writes that run's reports from it.

JOURNAL_PREFIX = "journal_"


def journal_line(entry: dict) -> bytes:
    """One entry as a line that proves itself whole: the CRC-32 of its JSON, a space, the JSON."""
    text = json.dumps(entry, default=str, ensure_ascii=True)
    return f"{zlib.crc32(text.encode('ascii')):08x} {text}\n".encode("ascii")


def parse_journal(data: bytes) -> tuple[list[dict], int]:
    """The whole entries of a journal and how many lines were torn or corrupt (those are ignored:
    a line counts only when it ends in a newline and its CRC matches)."""
    *lines, tail = data.split(b"\n")
    entries, torn = [], int(bool(tail.strip()))
    for line in lines:
        crc, _, text = line.partition(b" ")
        entry = None
        with contextlib.suppress(ValueError):
            if int(crc, 16) == zlib.crc32(text):
                entry = json.loads(text)
        if isinstance(entry, dict):
            entries.append(entry)
        elif line.strip():
            torn += 1
    return entries, torn


class RunJournal:
    """Append-only, fsync'd: the run's header, then 'started' and 'finished' per model, and
    'ended' once the run knows its outcome. The file is created with the first model's entry (a
    run stopped by a usage error leaves none). A journal that cannot be written is a warning:
    the run goes on, without the protection."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header, self.fd, self.failed = path, header, None, False

    def started(self, class_name: str, backend: str, node_label: str | None = None) -> None:
        self._append({"event": "started", "class_name": class_name, "backend": backend, "node_label": node_label})

    def finished(self, row: dict) -> None:
        self._append({"event": "finished", "row": row})

    def ended(self, complete: bool, exit_code: int, interrupted_by: str | None) -> None:
        """The run's own outcome, before its reports: a journal left after this was not a death."""
        self._append({"event": "ended", "complete": complete, "exit_code": exit_code, "interrupted_by": interrupted_by})

    def _open(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as e:
            self._give_up(e)
            return
        self._append({"event": "start", **self.header})
        fsync_folder(self.path.parent)
        if self.fd is None:  # not even the header: an empty journal would only puzzle the next run
            with contextlib.suppress(OSError):
                self.path.unlink()

    def discard(self) -> None:
        """The run's reports and history entry are written (and their names durable): the journal
        has done its work."""
        self.close()
        fsync_folder(self.path.parent)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _append(self, entry: dict) -> None:
        if self.fd is None and not self.failed:
            self._open()
        if self.fd is None:
            return
        data = journal_line({**entry, "wall_time": time.time()})
        try:
            while data:
                data = data[os.write(self.fd, data):]
            os.fsync(self.fd)
        except OSError as e:
            self._give_up(e)

    def _give_up(self, error: OSError) -> None:
        log(f"The progress journal {self.path} could not be written ({error.strerror or error}): if this run "
            f"dies, its finished models cannot be recovered", "WARNING")
        self.failed = True
        self.close()


def read_journal(path: Path) -> dict:
    """A dead run's journal: its header, finished rows, the models it started, torn lines."""
    entries, torn = parse_journal(path.read_bytes())
    if not entries or entries[0].get("event") != "start":
        raise OutputError(f"{path} has no readable header ({torn} torn line(s)): nothing can be recovered from it; "
                          f"move it aside")
    rows = [e["row"] for e in entries if e.get("event") == "finished"]
    started = [run_key(e["class_name"], e.get("backend", "torch"), e.get("node_label"))
               for e in entries if e.get("event") == "started"]
    ended = next((e for e in entries if e.get("event") == "ended"), None)
    return {"header": entries[0], "rows": rows, "started": started, "ended": ended, "torn_lines": torn,
            "last_wall_time": entries[-1]["wall_time"]}


def lost_models(planned: list[str], started: list[str], rows: list[dict]) -> list[str]:
    """What a dead run lost: the models it was running (each start without its row), then those it
    never started. planned and started hold run_key()s, a row on several nodes once per node."""
    done = collections.Counter(row_key(r) for r in rows)
    running = []
    for name in started:
        if done[name]:
            done[name] -= 1
        else:
            running.append(name)
    begun = {name.split(" @ ")[0] for name in started} | {row_key(r).split(" @ ")[0] for r in rows}
    return [f"{c} (running when the run died)" for c in running] + [f"{c} (not started)" for c in planned if c not in begun]


# --------------------------------------------------------------------------------------
# The runner: one worker process per model, supervised
# --------------------------------------------------------------------------------------

WORKER_STOP_GRACE_SEC = 10.0     # after a forwarded signal or a timeout; then SIGKILL
WORKER_LOG_LINES = 20            # last output lines of a worker kept for its crash report
WORKER_POLL_SEC = 0.25           # how often the runner samples a worker's RSS and deadline
ISOLATION_MODES = ("process", "none")


@dataclass
class RunConfig:
    models: list[type[ModelBenchmark]]
    images: list[Path]
    image_source: str
    runs: int
    device: torch.device
    weights: str
    models_dir: Path
    output_dir: Path
    dissect: bool
    dissect_mode: str
    keep_going: bool
    isolation: str = "process"
    model_timeout_sec: float | None = None
    work_dir: Path | None = None     # the run's temporary files: worker jobs, random checkpoints
    timestamp: str = ""
    started_at: str = ""             # ISO time: orders runs in the history
    device_request: str = "auto"     # --device as given (a Ray node resolves "auto" itself)
    dissect_filter: str | None = None
    dissect_max_mb: float | None = None
    parity_layers: bool = False
    executor_info: dict = field(default_factory=lambda: {"executor": "local"})
    skips: dict[str, str] = field(default_factory=dict)
    options: RunOptions = field(default_factory=RunOptions)
    backends: list[str] = field(default_factory=lambda: ["torch"])  # --backend, in order: each model once per backend
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    history: str | None = None       # the history file this run is stored in (None: --no-history)
    history_keep_runs: int | None = None  # --history-keep-runs (None: keep every run)
    keep_viz: int | None = None  # --keep-viz (None: keep every run's pictures)
    journal: RunJournal | None = None
    expected_wall_sec: dict[str, float] = field(default_factory=dict)  # per model, from the history (time left)
    usable_cpus: int = field(default_factory=lambda: usable_cpus())  # when the run began (a recovery reads the dead run's)

    RECORD_SKIPS = ("work_dir", "journal", "expected_wall_sec")  # this process's, never a dead run's

    def record(self) -> dict:
        """The configuration as JSON values, for the journal (from_record reads it back)."""
        values = {f: getattr(self, f) for f in self.__dataclass_fields__ if f not in self.RECORD_SKIPS}
        return {**values, "models": [c.__name__ for c in self.models], "images": [str(p) for p in self.images],
                "device": str(self.device), "models_dir": str(self.models_dir), "output_dir": str(self.output_dir),
                "options": asdict(self.options)}

    @classmethod
    def from_record(cls, record: dict) -> RunConfig:
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__ and k not in cls.RECORD_SKIPS}
        options = {k: v for k, v in record["options"].items() if k in RunOptions.__dataclass_fields__}
        return cls(**{**known, "models": resolve_models(",".join(record["models"])),
                      "images": [Path(p) for p in record["images"]], "device": torch.device(record["device"]),
                      "models_dir": Path(record["models_dir"]), "output_dir": Path(record["output_dir"]),
                      "backends": record.get("backends") or [options.get("backend", "torch")],  # before backend lists
                      "options": RunOptions(**{**options, "backend": "torch"})})

    @property
    def units(self) -> list[tuple[type[ModelBenchmark], str]]:
        """What the run benchmarks, in order: every model once per backend (a row each)."""
        return [(cls, backend) for cls in self.models for backend in self.backends]

    def note_started(self, cls: type[ModelBenchmark], backend: str, node_label: str | None = None) -> None:
        if self.journal:
            self.journal.started(cls.__name__, backend, node_label)

    def note_finished(self, row: dict) -> None:
        if self.journal:
            self.journal.finished(row)

    @property
    def results_dir(self) -> Path:
        return self.output_dir / "results"

    @property
    def viz_dir(self) -> Path:
        return self.output_dir / "viz" / self.timestamp

    def job(self, cls: type[ModelBenchmark], backend: str = "torch") -> WorkerJob:
        """One row's job. With several backends a model is dissected in its first backend's row only
        (the same PyTorch module each time); the others say where."""
        options, notes = backend_options(self.options, backend)
        dissect = self.dissect and backend == self.backends[0]
        if self.dissect and not dissect:
            notes.append(f"dissected in its {self.backends[0]} row (the same PyTorch module)")
        return WorkerJob(class_name=cls.__name__, device=str(self.device), weights=self.weights,
                         models_dir=str(self.models_dir), images=[str(p) for p in self.images], runs=self.runs,
                         dissect=dissect, dissect_mode=self.dissect_mode, viz_dir=str(self.viz_dir),
                         dissect_filter=self.dissect_filter, dissect_max_mb=self.dissect_max_mb,
                         options=asdict(options), parity_layers=self.parity_layers, notes=notes)


def this_program(*args: str) -> list[str]:
    """The command line that runs this same file in a fresh interpreter."""
    return [sys.executable, str(SCRIPT_PATH), *args]


def worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def random_checkpoint_cache(cls: type[ModelBenchmark]) -> Path:
    """The cached seeded random checkpoint of a model: named by everything the build depends on
    (this program's text, the seed, the library versions), so a change builds afresh."""
    depends = json.dumps([RANDOM_SEED, package_version("ultralytics"), torch.__version__,
                          os.environ.get(REDUCED_CONFIG_ENV)])
    key = hashlib.sha256(SCRIPT_PATH.read_bytes() + depends.encode()).hexdigest()
    return cache_folder() / f"{cls.__name__}-random-{key[:16]}.pt"


def prepare_random_checkpoint(cls: type[ModelBenchmark], weights: str, work_dir: Path,
                              timeout_sec: float | None = None) -> Path | None:
    """Seeded random weights for a model whose builder runs a forward: built and saved by a
    short-lived process (once: later runs take the cached file) and loaded like a pretrained
    checkpoint. A builder past timeout_sec is killed (subprocess.TimeoutExpired)."""
    if weights != "random" or not cls.RANDOM_BUILD_RUNS_FORWARD:
        return None
    cached = random_checkpoint_cache(cls)
    if cached.is_file():
        log(f"Seeded random weights from the cache {cached} (built by a short-lived process in an earlier run; "
            f"the benchmarked process loads the checkpoint)", "LOAD")
        return cached
    path = work_dir / f"{cls.__name__}-random.pt"
    start = time.perf_counter()
    proc = subprocess.run(this_program("--build-random", cls.__name__, str(path)), capture_output=True,
                          text=True, env=worker_env(), timeout=timeout_sec)
    if proc.returncode != 0 or not path.is_file():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise BenchError(f"building seeded random weights for {cls.__name__} failed (exit {proc.returncode}): {tail}")
    log(f"Seeded random weights built and saved by a short-lived process in {time.perf_counter() - start:.2f}s "
        f"(the builder runs a forward; the benchmarked process loads the checkpoint)", "LOAD")
    tmp = None
    try:  # whole and durable, or not at all: a torn cache file would be loaded by every later run
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{cached.name}.", suffix=".tmp", dir=cached.parent)
        with os.fdopen(fd, "wb") as f, open(path, "rb") as src:
            shutil.copyfileobj(src, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cached)
        fsync_folder(cached.parent)
    except OSError as e:
        with contextlib.suppress(OSError, TypeError):
            os.unlink(tmp)
        log(f"The random checkpoint could not be cached in {cached.parent} ({e.strerror or e}): later runs build "
            f"it again (set {CACHE_ENV} to a writable folder)", "WARNING")
    return path


class WorkerProcess:
    """One model's worker: a fresh interpreter running this file (spawn, not fork: no inherited
    CUDA or thread state). Its output is echoed and its last lines kept; progress and the
    result arrive as JSON lines on a pipe of their own. Own session: the runner forwards signals."""

    def __init__(self, job: WorkerJob, job_path: Path):
        self.job = job
        job_path.write_text(json.dumps(vars(job)), encoding="utf-8")
        read_fd, write_fd = os.pipe()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(this_program("--worker", str(job_path), str(write_fd)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                                     start_new_session=True, env=worker_env())
        os.close(write_fd)
        self.progress = ModelProgress()
        self.result: dict | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=WORKER_LOG_LINES)
        self.rss_seen_mb: float | None = None
        self._pending = {self.proc.stdout.fileno(): b"", read_fd: b""}
        self._handlers = {self.proc.stdout.fileno(): self._on_output, read_fd: self._on_message}
        self._selector = selectors.DefaultSelector()
        for fd in self._pending:
            os.set_blocking(fd, False)
            self._selector.register(fd, selectors.EVENT_READ)

    def pump(self, deadline: float | None) -> bool:
        """Echo output and take messages until the worker exits (True) or the monotonic
        deadline passes (False)."""
        while self.proc.poll() is None:
            timeout = WORKER_POLL_SEC if deadline is None else min(WORKER_POLL_SEC, deadline - time.monotonic())
            if timeout <= 0:
                return False
            self._read_ready(timeout)
            self._sample_rss()
        self._read_ready(0.5, until_eof=True)
        return True

    def stop(self, signum: int) -> None:
        """Send signum; after WORKER_STOP_GRACE_SEC without an exit, SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)
        if not self.pump(time.monotonic() + WORKER_STOP_GRACE_SEC):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.pump(None)

    def close(self) -> None:
        for key in list(self._selector.get_map().values()):
            self._close_fd(key.fd)
        self._selector.close()
        self.proc.stdout.close()

    def _read_ready(self, timeout: float, until_eof: bool = False) -> None:
        if not self._selector.get_map():  # both pipes closed: wait for the exit without spinning
            time.sleep(0 if until_eof else timeout)
        while self._selector.get_map():
            events = self._selector.select(timeout)
            if not events:
                break
            for key, _ in events:
                self._read(key.fd)
            if not until_eof:
                break

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        data = self._pending[fd] + chunk
        *lines, self._pending[fd] = data.split(b"\n")
        if not chunk:  # end of file: what is left is a last line without a newline
            lines, self._pending[fd] = lines + ([self._pending[fd]] if self._pending[fd] else []), b""
            self._close_fd(fd)
        for line in lines:
            self._handlers[fd](line.decode("utf-8", "replace"))

    def _close_fd(self, fd: int) -> None:
        self._selector.unregister(fd)
        if fd != self.proc.stdout.fileno():
            os.close(fd)

    def _on_output(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        self.lines.append(line)

    def _on_message(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:  # cut short by the worker's death
            return
        if message["type"] == "progress":
            self.progress.update(phase=message["phase"], image=message["image"], rss_peak_mb=message["rss_peak_mb"])
        elif message["type"] == "result":
            self.result = message["row"]

    def _sample_rss(self) -> None:
        with contextlib.suppress(psutil.Error):
            rss = to_mb(psutil.Process(self.proc.pid).memory_info().rss)
            self.rss_seen_mb = max(rss, self.rss_seen_mb or 0.0)

    @property
    def last_peak_rss_mb(self) -> float | None:
        return max(filter(None, [self.progress.rss_peak_mb, self.rss_seen_mb]), default=None)


def dead_worker_row(cls: type[ModelBenchmark], worker: WorkerProcess, status: str, cause: str) -> dict:
    """The row of a worker that died or hung: what, where, and its last output lines."""
    code = worker.proc.returncode
    signame = signal.Signals(-code).name if code is not None and code < 0 else None
    peak = worker.last_peak_rss_mb
    message = f"{cls.__name__}: worker process {worker.proc.pid} {cause} {worker.progress.where()}"
    if signame == "SIGKILL" and status == "crashed":
        message += (f" (SIGKILL from outside is most likely the kernel's out-of-memory killer; the worker's "
                    f"last peak RSS was {fmt(peak, '.0f')} MB)")
    log(message, "ERROR")
    return status_row(cls, status, message, worker.progress, worker.job.backend, worker_pid=worker.proc.pid,
                      worker_exit_code=code,
                      worker_signal=signame, last_peak_rss_mb=peak, last_log_lines=list(worker.lines))


def run_in_worker(job: WorkerJob, work_dir: Path, timeout_sec: float | None, since: float | None = None) -> dict:
    """One model in a fresh worker process: its row, or a crashed / timed_out row. The timeout
    counts from `since` (monotonic: the model's start, its random-weights build included)."""
    cls = job.model_class
    worker = WorkerProcess(job, work_dir / f"{cls.__name__}-{job.backend}.job.json")
    log(f"Worker process {worker.proc.pid} started for {cls.__name__}", "WORKER")
    deadline = None if timeout_sec is None else (since or worker.started) + timeout_sec
    try:
        finished = worker.pump(deadline)
        if not finished:
            log(f"{cls.__name__} passed --model-timeout {timeout_sec:g}s {worker.progress.where()}: "
                f"stopping its worker", "ERROR")
            worker.stop(signal.SIGTERM)
            return dead_worker_row(cls, worker, "timed_out", f"passed --model-timeout {timeout_sec:g}s "
                                   f"and was stopped (exit {worker.proc.returncode})")
    except (KeyboardInterrupt, RunInterrupted) as e:
        worker.stop(e.signum if isinstance(e, RunInterrupted) else signal.SIGINT)
        raise
    finally:
        worker.close()
    if worker.result is not None:
        return {**worker.result, "worker_pid": worker.proc.pid, "worker_exit_code": worker.proc.returncode}
    code = worker.proc.returncode
    cause = (f"was killed by {signal.Signals(-code).name}" if code < 0
             else f"exited with code {code} without a result")
    return dead_worker_row(cls, worker, "crashed", cause)


def run_in_process(job: WorkerJob) -> dict:
    """--isolation none: today's single process (debuggers, profilers); cleanup between models."""
    row = run_model(job, ModelProgress())
    release_host_memory()  # the exception's frames are gone: free what they held
    if job.device.startswith("cuda"):
        cuda_empty_cache()
    return row


def execute_job(job: WorkerJob, isolation: str, work_dir: Path, timeout_sec: float | None) -> dict:
    """One model, its random weights prepared, isolated as asked; always a row (interrupts propagate).
    timeout_sec (--model-timeout, process isolation) covers the builder and the worker together."""
    cls, started = job.model_class, time.monotonic()
    try:
        checkpoint = prepare_random_checkpoint(cls, job.weights, work_dir, timeout_sec)
    except BenchError as e:
        log(str(e), "ERROR")
        return status_row(cls, "failed", str(e), ModelProgress(), job.backend, failed_phase="prepare random weights")
    except subprocess.TimeoutExpired:
        message = (f"{cls.__name__}: building its seeded random weights passed --model-timeout {timeout_sec:g}s "
                   f"and the builder was killed")
        log(message, "ERROR")
        return status_row(cls, "timed_out", message, ModelProgress(), job.backend,
                          failed_phase="prepare random weights")
    job.random_checkpoint = str(checkpoint) if checkpoint else None
    row = run_in_worker(job, work_dir, timeout_sec, started) if isolation == "process" else run_in_process(job)
    return {**row, "isolation": isolation}


def execute_model(cls: type[ModelBenchmark], backend: str, cfg: RunConfig, eta: dict | None = None) -> dict:
    job = cfg.job(cls, backend)
    job.eta = eta or {}
    return execute_job(job, cfg.isolation, cfg.work_dir, cfg.model_timeout_sec)


def model_eta(cfg: RunConfig, position: int, finished_walls: list[float]) -> dict:
    """The estimate a row's worker gets (its expected wall time, the later rows'), and the
    [ETA] line that opens the row."""
    cls, backend = cfg.units[position - 1]
    name = run_key(cls.__name__, backend)
    expected = cfg.expected_wall_sec.get(name)
    later = [run_key(c.__name__, b) for c, b in cfg.units[position:] if c.__name__ not in cfg.skips]
    after = later_models_sec([cfg.expected_wall_sec.get(key) for key in later], finished_walls)
    run_left = expected + after if expected is not None and after is not None else None
    why = ("median of its last runs in this configuration" if expected is not None else
           "no earlier complete run of this configuration in the history" if cfg.history else "no history")
    log(f"{name}: ~{duration_text(expected)} expected ({why}); the run: ~{duration_text(run_left)} left with "
        f"{len(later)} model(s) after this one", "ETA")
    source = eta_source(expected is not None, all(cfg.expected_wall_sec.get(key) is not None for key in later))
    return {"expected_sec": expected, "after_sec": after, "launched_at": time.time(), "source": source}


@dataclass
class RunOutcome:
    results: list[dict]
    exit_code: int
    complete: bool
    interrupted_by: str | None = None


def run_benchmark(cfg: RunConfig) -> RunOutcome:
    """Benchmark the selected models one after another (fail-fast unless --keep-going). An
    interrupt anywhere in the loop (a model, the pause between models) keeps what finished."""
    results: list[dict] = []
    try:
        return run_models(cfg, results)
    except KeyboardInterrupt:
        return RunOutcome(results, EXIT_SIGINT, False, "SIGINT")
    except RunInterrupted as e:
        return RunOutcome(results, EXIT_SIGINT if e.signum == signal.SIGINT else EXIT_SIGTERM, False,
                          signal.Signals(e.signum).name)


def run_models(cfg: RunConfig, results: list[dict]) -> RunOutcome:
    """The loop of run_benchmark: each row appended to results (and the journal) as it comes."""
    exit_code, finished_walls = EXIT_OK, []
    for position, (cls, backend) in enumerate(cfg.units, 1):
        name = run_key(cls.__name__, backend)
        banner(f"[{position}/{len(cfg.units)}] {name}")
        if cls.__name__ in cfg.skips:
            log(f"Skipping {name}: {cfg.skips[cls.__name__]}", "SKIP")
            results.append(status_row(cls, "skipped", cfg.skips[cls.__name__], backend=backend))
            cfg.note_finished(results[-1])
            continue
        cfg.note_started(cls, backend)
        started = time.perf_counter()
        row = execute_model(cls, backend, cfg, model_eta(cfg, position, finished_walls))
        row["model_wall_sec"] = time.perf_counter() - started
        if row["status"] == "ok":
            finished_walls.append(row["model_wall_sec"])
        results.append(row)
        cfg.note_finished(row)
        if row["status"] in FAILED_STATUSES:
            exit_code = EXIT_MODEL_FAILED
            if not cfg.keep_going:
                return RunOutcome(results, exit_code, False)
        elif row["status"] == "ok":
            log(f"{name} finished", "COMPLETE")
        if cfg.device.type == "cuda":
            time.sleep(CLEANUP_SLEEP_SEC)
    return RunOutcome(results, exit_code, True)


# --------------------------------------------------------------------------------------
# History and verdicts: SQLite run history, regression verdicts, comparison
# --------------------------------------------------------------------------------------

HISTORY_FILE_NAME = "history.sqlite"
SITE_FILE_NAME = "index.html"    # the trend site, beside the history's reports (Trend site)
HISTORY_SCHEMA_VERSION = 2
BASELINE_MAX_RUNS = 10           # earlier runs a verdict compares against, most recent first
BASELINE_MIN_RUNS = 3            # fewer: "insufficient data"
VERDICT_ALPHA = 0.01             # one-sided exact Mann-Whitney U
WARM_MIN_RATIO = 1.10            # warm median ratio a verdict needs at least ...
COLD_MIN_RATIO = 1.25            # ... and the cold start
NOISE_BAND_FACTOR = 4.0          # ... or 1 + 4 x the robust CV of the past, when wider
MEMORY_MIN_REL, MEMORY_MIN_MB = 0.05, 64.0   # memory peak: both must be exceeded
ENV_KEYS_COMPARED = ("torch", "transformers", "ultralytics", "onnx", "onnxruntime", "openvino", "cuda_version",
                     "cudnn_version", "python", "os")
FLAGGED = ("suspicious", "regression")
DRIFT_WINDOW_RUNS = 20           # the slow-drift rule: this run and up to 19 before it ...
DRIFT_MIN_RUNS = 8               # ... at least 8 of them
DRIFT_EDGE_RUNS = 3              # the cumulative change: the median of the newest 3 over the oldest 3
DRIFT_ALPHA = 0.05               # one-sided Mann-Kendall (Kendall's tau of the value against run order) ...
DRIFT_FLOORS = {"warm latency": 0.08, "cold start": 0.25, "memory peak": MEMORY_MIN_REL}  # ... AND a cumulative change
FAILING = ("regression", "drifting")  # what --fail-on-regression fails on
HISTORY_LOCK_TIMEOUT_SEC = 30.0  # how long a run waits for another process's write to the history

HISTORY_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, timestamp TEXT, machine_key TEXT NOT NULL,
    hostname TEXT, environment TEXT NOT NULL, complete INTEGER, source TEXT NOT NULL);
CREATE TABLE model_results (
    run_id TEXT NOT NULL REFERENCES runs(run_id), class_name TEXT NOT NULL, machine_key TEXT NOT NULL,
    model_name TEXT, config_key TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL, noisy INTEGER,
    load_time_sec REAL, runtime_init_sec REAL, download_sec REAL, cold_inference_sec REAL,
    warm_median_sec REAL, mem_peak_mb REAL, rss_peak_mb REAL, cuda_peak_allocated_mb REAL,
    total_params INTEGER, input_shape TEXT, row TEXT NOT NULL, PRIMARY KEY (run_id, class_name, machine_key));
CREATE TABLE samples (
    run_id TEXT NOT NULL, class_name TEXT NOT NULL, machine_key TEXT NOT NULL, image TEXT NOT NULL,
    run INTEGER NOT NULL, inference_sec REAL NOT NULL, preprocess_sec REAL, postprocess_sec REAL, peak_mb REAL,
    input_shape TEXT, PRIMARY KEY (run_id, class_name, machine_key, image, run));
CREATE TABLE verdicts (
    run_id TEXT NOT NULL, class_name TEXT NOT NULL, machine_key TEXT NOT NULL, metric TEXT NOT NULL,
    verdict TEXT NOT NULL, baseline REAL, now REAL, ratio REAL, p_value REAL, threshold REAL,
    baseline_runs INTEGER, detail TEXT, PRIMARY KEY (run_id, class_name, machine_key, metric));
CREATE INDEX model_results_by_config ON model_results (config_key, class_name, machine_key);
"""
# Each later schema version: the SQL statements that upgrade the one before (run in one
# transaction with the version's update). A new history is created as version 1 and upgraded,
# so every step runs on every history.
HISTORY_MIGRATIONS: dict[int, str] = {
    # 2: the backend (--backend) in the rows' identity, so one run stores a model once per backend.
    # Existing rows take their row's runtime (torch before there were runtimes); rowid order is kept.
    2: """
DROP INDEX model_results_by_config;
ALTER TABLE model_results RENAME TO model_results_v1;
ALTER TABLE samples RENAME TO samples_v1;
ALTER TABLE verdicts RENAME TO verdicts_v1;
CREATE TABLE model_results (
    run_id TEXT NOT NULL REFERENCES runs(run_id), class_name TEXT NOT NULL, backend TEXT NOT NULL DEFAULT 'torch',
    machine_key TEXT NOT NULL, model_name TEXT, config_key TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL,
    noisy INTEGER, load_time_sec REAL, runtime_init_sec REAL, download_sec REAL, cold_inference_sec REAL,
    warm_median_sec REAL, mem_peak_mb REAL, rss_peak_mb REAL, cuda_peak_allocated_mb REAL,
    total_params INTEGER, input_shape TEXT, row TEXT NOT NULL, PRIMARY KEY (run_id, class_name, backend, machine_key));
CREATE TABLE samples (
    run_id TEXT NOT NULL, class_name TEXT NOT NULL, backend TEXT NOT NULL DEFAULT 'torch', machine_key TEXT NOT NULL,
    image TEXT NOT NULL, run INTEGER NOT NULL, inference_sec REAL NOT NULL, preprocess_sec REAL, postprocess_sec REAL,
    peak_mb REAL, input_shape TEXT, PRIMARY KEY (run_id, class_name, backend, machine_key, image, run));
CREATE TABLE verdicts (
    run_id TEXT NOT NULL, class_name TEXT NOT NULL, backend TEXT NOT NULL DEFAULT 'torch', machine_key TEXT NOT NULL,
    metric TEXT NOT NULL, verdict TEXT NOT NULL, baseline REAL, now REAL, ratio REAL, p_value REAL, threshold REAL,
    baseline_runs INTEGER, detail TEXT, PRIMARY KEY (run_id, class_name, backend, machine_key, metric));
INSERT INTO model_results SELECT run_id, class_name, COALESCE(json_extract(row, '$.runtime'), 'torch'), machine_key,
    model_name, config_key, config, status, noisy, load_time_sec, runtime_init_sec, download_sec, cold_inference_sec,
    warm_median_sec, mem_peak_mb, rss_peak_mb, cuda_peak_allocated_mb, total_params, input_shape, row
    FROM model_results_v1 ORDER BY rowid;
INSERT INTO samples SELECT s.run_id, s.class_name, COALESCE(m.backend, 'torch'), s.machine_key, s.image, s.run,
    s.inference_sec, s.preprocess_sec, s.postprocess_sec, s.peak_mb, s.input_shape
    FROM samples_v1 s LEFT JOIN model_results m USING (run_id, class_name, machine_key) ORDER BY s.rowid;
INSERT INTO verdicts SELECT v.run_id, v.class_name, COALESCE(m.backend, 'torch'), v.machine_key, v.metric, v.verdict,
    v.baseline, v.now, v.ratio, v.p_value, v.threshold, v.baseline_runs, v.detail
    FROM verdicts_v1 v LEFT JOIN model_results m USING (run_id, class_name, machine_key) ORDER BY v.rowid;
DROP TABLE model_results_v1;
DROP TABLE samples_v1;
DROP TABLE verdicts_v1;
CREATE INDEX model_results_by_config ON model_results (config_key, class_name, backend, machine_key);
""",
}


def short_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def machine_key(env: dict) -> str:
    """Stable fields only (never readings that change between boots): host, CPU, GPU and count."""
    gpu_count = env.get("gpu_count", 1 if env.get("gpu_name") else 0)
    return short_hash([env.get("hostname"), env.get("cpu_model"), env.get("gpu_name"), gpu_count])


def image_fingerprints(paths: list[Path]) -> list[dict]:
    """Name, size and content hash of each image: the image set is part of a configuration."""
    prints = []
    for path in paths:
        entry: dict[str, Any] = {"name": Path(path).name}
        with contextlib.suppress(OSError):
            data = Path(path).read_bytes()
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        prints.append(entry)
    return prints


def row_machine_key(payload: dict, row: dict) -> str:
    """The machine a row ran on: its cluster node's key (--executor ray: numbered when several nodes
    share a host, see node_key), else its node's machine key, else the run's."""
    return row.get("node_key") or (row.get("node") or {}).get("machine_key") or payload["machine_key"]


def config_fields(cfg: RunConfig) -> dict:
    """The run's part of every model's configuration key (model_config reads them from a payload)."""
    return {"device": str(cfg.device), "weights": cfg.weights, "image_set": image_fingerprints(cfg.images),
            "num_inference_runs": cfg.runs, "isolation": cfg.isolation, "options": cfg.options.key(cfg.usable_cpus)}


def model_config(payload: dict, row: dict) -> dict:
    """What must match for two figures to be comparable (library versions are not part of it)."""
    return {
        "model": row["class_name"],
        "weights": payload.get("weights"),
        "device_type": str(row.get("device") or payload.get("device", "cpu")).split(":")[0],  # a row's own (Ray)
        "input_size": row.get("input_size"),
        "images": payload.get("image_set") or image_fingerprints([Path(p) for p in payload.get("images", [])]),
        "runs_per_image": payload.get("num_inference_runs"),
        "isolation": payload.get("isolation", "none"),  # reports before worker processes ran in one process
        "options": row_options_key(payload.get("options", {}), row),
    }


def row_options_key(run_options: dict, row: dict) -> dict:
    """The run's options key as this row ran them: its own backend (left out for torch, as runs from
    before --backend), and without PyTorch's options on a runtime's row (backend_options)."""
    backend = row_backend(row) if "runtime" in row else run_options.get("backend", "torch")
    key = {k: v for k, v in run_options.items() if k != "backend"}
    if backend == "torch":
        return key
    return {**{k: v for k, v in key.items() if k not in TORCH_ONLY_DEFAULTS}, "backend": backend}


def robust_cv(values: list[float]) -> float:
    """Median absolute deviation over the median: a spread that one outlier cannot inflate."""
    median = float(np.median(values))
    return float(np.median(np.abs(np.asarray(values) - median))) / median if median > 0 else 0.0


def escalate(previous: str | None) -> str:
    """A change seen for the first time is suspicious; seen again in the next run, a regression."""
    return "regression" if previous in FLAGGED else "suspicious"


def warm_verdict(now: list[float], past: list[list[float]], previous: str | None = None) -> dict:
    """This run's warm samples against the pooled warm samples of earlier runs (most recent first).

    Slower when an exact one-sided Mann-Whitney U test says so at VERDICT_ALPHA AND the median
    ratio reaches max(WARM_MIN_RATIO, 1 + 4 x robust CV of the past runs' medians): the test
    alone fires on run-to-run drift, the ratio alone on one noisy run.
    """
    past = [p for p in past if p][:BASELINE_MAX_RUNS]
    if len(past) < BASELINE_MIN_RUNS or not now:
        return {"verdict": "insufficient data", "baseline_runs": len(past)}
    from scipy.stats import mannwhitneyu  # about a second to import: only when there is something to judge

    pooled = [t for p in past for t in p]
    baseline, current = float(np.median(pooled)), float(np.median(now))
    ratio = current / baseline
    threshold = max(WARM_MIN_RATIO, 1 + NOISE_BAND_FACTOR * robust_cv([float(np.median(p)) for p in past]))
    side = "greater" if ratio >= 1 else "less"
    p_value = float(mannwhitneyu(now, pooled, alternative=side, method="exact").pvalue)
    if p_value < VERDICT_ALPHA and ratio >= threshold:
        verdict = escalate(previous)
    elif p_value < VERDICT_ALPHA and ratio <= 1 / threshold:
        verdict = "faster"
    else:
        verdict = "no change"
    return {"verdict": verdict, "baseline": baseline, "now": current, "ratio": ratio, "p_value": p_value,
            "threshold": threshold, "baseline_runs": len(past)}


def cold_verdict(now: float | None, past: list[float], previous: str | None = None) -> dict:
    """One cold start against the median of the last cold starts: max(1.25, 1 + 4 x MAD/median)."""
    past = [p for p in past if p is not None][:BASELINE_MAX_RUNS]
    if len(past) < BASELINE_MIN_RUNS or now is None:
        return {"verdict": "insufficient data", "baseline_runs": len(past)}
    baseline = float(np.median(past))
    ratio = now / baseline
    threshold = max(COLD_MIN_RATIO, 1 + NOISE_BAND_FACTOR * robust_cv(past))
    verdict = escalate(previous) if ratio >= threshold else "faster" if ratio <= 1 / threshold else "no change"
    return {"verdict": verdict, "baseline": baseline, "now": now, "ratio": ratio, "threshold": threshold,
            "baseline_runs": len(past)}


def memory_verdict(now_mb: float | None, past_mb: list[float], previous: str | None = None) -> dict:
    """A memory peak more than 5% and more than 64 MiB above the median of the last runs."""
    past_mb = [p for p in past_mb if p is not None][:BASELINE_MAX_RUNS]
    if len(past_mb) < BASELINE_MIN_RUNS or now_mb is None:
        return {"verdict": "insufficient data", "baseline_runs": len(past_mb)}
    baseline = float(np.median(past_mb))
    delta = now_mb - baseline
    beyond = abs(delta) > MEMORY_MIN_REL * baseline and abs(delta) > MEMORY_MIN_MB
    verdict = (escalate(previous) if delta > 0 else "lower") if beyond else "no change"
    return {"verdict": verdict, "baseline": baseline, "now": now_mb, "ratio": now_mb / baseline if baseline else None,
            "threshold": 1 + MEMORY_MIN_REL, "baseline_runs": len(past_mb)}


def warm_samples(row: dict) -> list[float]:
    return [r["inference_sec"] for r in row.get("runs", []) if r["run"] > 1]


def metric_value(row: dict, metric: str) -> float | None:
    """One run's figure for a metric: its warm median (from its samples), cold start or memory peak."""
    if metric == "warm latency":
        warm = warm_samples(row)
        return float(np.median(warm)) if warm else row.get("warm_median_sec")
    return row.get("cold_inference_sec" if metric == "cold start" else "mem_peak_mb")


def drift_start(values: list[float]) -> int:
    """Where a rise began: the first run of the best least-squares fit of "flat, then a straight
    rise" (a step is a steep rise); at least 1, at most len - 3, so both sides have runs."""
    y, index = np.asarray(values, dtype=float), np.arange(len(values))

    def misfit(start: int) -> float:
        design = np.column_stack([np.ones(len(y)), np.maximum(0, index - start + 1)])
        return float(np.sum((design @ np.linalg.lstsq(design, y, rcond=None)[0] - y) ** 2))

    return min(range(1, len(values) - 2), key=misfit)


def drift_verdict(values: list[float], metric: str) -> dict | None:
    """A slow drift in a series of run figures (oldest first, this run last): a one-sided
    Mann-Kendall test at DRIFT_ALPHA AND a cumulative change (the median of the newest 3 runs
    over the median of the oldest 3) of at least the metric's floor, and for memory at least
    MEMORY_MIN_MB too; drift_start says where the rise began. None: no drift, or too few runs."""
    if len(values) < DRIFT_MIN_RUNS:
        return None
    before, now = float(np.median(values[:DRIFT_EDGE_RUNS])), float(np.median(values[-DRIFT_EDGE_RUNS:]))
    change = now / before - 1 if before else 0.0
    if change < DRIFT_FLOORS[metric] or (metric == "memory peak" and now - before <= MEMORY_MIN_MB):
        return None
    from scipy.stats import kendalltau

    p_value = float(kendalltau(np.arange(len(values)), values, alternative="greater").pvalue)
    if p_value >= DRIFT_ALPHA:
        return None
    start = drift_start(values)
    return {"verdict": "drifting", "baseline": before, "now": now, "ratio": now / before, "p_value": p_value,
            "threshold": 1 + DRIFT_FLOORS[metric], "baseline_runs": len(values) - 1, "drift_start": start,
            "detail": f"{change:+.1%} over the last {len(values) - start} of {len(values)} runs"}


def drift_series(row: dict, earlier: list[dict], metric: str) -> list[tuple[str, float]]:
    """(started_at, figure) of up to DRIFT_WINDOW_RUNS runs, oldest first, this run last. The
    series begins at the latest run judged a change for the metric: by the night-over-night rules
    (a regression they reported is not a drift) or by this rule (a drift is reported once, and
    again only when the figures go on rising from where it was reported)."""
    points = [("this run", metric_value(row, metric))]
    for run in earlier[:DRIFT_WINDOW_RUNS - 1]:
        points.append((run.get("started_at", "?"), metric_value(run, metric)))
        if (run["verdicts"].get(metric) in ("regression", "faster", "lower")
                or run["verdicts"].get(f"{metric} trend") == "drifting"):
            break
    return [(when, value) for when, value in reversed(points) if value is not None]


def drift_verdicts(row: dict, earlier: list[dict], now: dict[str, str]) -> list[dict]:
    """The slow-drift rule over each metric's series: a 'drifting' verdict (metric '<metric> trend')
    naming the run where the rise began, for each metric that drifts and that this run's
    night-over-night verdicts (now: metric -> verdict) do not already call a regression."""
    found = []
    for metric in DRIFT_FLOORS:
        if now.get(metric) == "regression":
            continue
        series = drift_series(row, earlier, metric)
        if drift := drift_verdict([value for _, value in series], metric):
            drift["detail"] += f", since the run of {series[drift.pop('drift_start')][0]}"
            found.append({"metric": f"{metric} trend", **drift})
    return found


def environment_changes(now: dict, before: dict | None) -> list[str]:
    """Library and system versions that differ from the most recent earlier run ('torch 2.4 -> 2.5')."""
    if not before:
        return []
    return [f"{k} {before.get(k)} -> {now.get(k)}" for k in ENV_KEYS_COMPARED if before.get(k) != now.get(k)]


def payload_from_report(path: Path) -> dict:
    """A report JSON (this version's, an earlier one's, or the spec's layout) with run id, start time
    and keys filled in; what could not be taken from it is in payload["import_notes"]."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable report JSON ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise UsageError(f"{path} is not a vision-bench report: no 'results' list")
    notes = payload["import_notes"] = [n for n in payload.get("import_notes") or [] if isinstance(n, str)]
    rows = [report_row(raw, i, path, notes) for i, raw in enumerate(payload["results"], 1)]
    payload["results"] = list({row_key(r): r for r in rows if r is not None}.values())
    if len(payload["results"]) < len([r for r in rows if r is not None]):
        notes.append("a model appears more than once: its last row is kept")
    if not isinstance(payload.get("environment"), dict):
        notes.append(f"no environment: the host is taken as this machine's ({socket.gethostname()}), library "
                     f"versions are unknown")
        payload["environment"] = {"device": payload.get("device")}
    env = payload["environment"]
    env.setdefault("hostname", socket.gethostname())  # reports before run ids: the importing host's
    if not isinstance(payload.get("run_id"), str):
        payload["run_id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, hashlib.sha256(path.read_bytes()).hexdigest()))
    if not isinstance(payload.get("started_at"), str):
        payload["started_at"] = report_start(payload.get("timestamp"), path, notes)
    if not isinstance(payload.get("timestamp"), str):
        payload["timestamp"] = None
    if not isinstance(payload.get("machine_key"), str):
        payload["machine_key"] = machine_key(env)
    payload.setdefault("complete", True)  # reports before the flag were written by finished runs
    return payload


def report_start(stamp: Any, path: Path, notes: list[str]) -> str:
    """A report's start time from its timestamp, else (noted) the file's modification time."""
    with contextlib.suppress(TypeError, ValueError):
        return datetime.strptime(stamp, TIMESTAMP_FORMAT).isoformat()
    notes.append(f"timestamp {stamp!r} is not {TIMESTAMP_FORMAT}: the file's modification time is used")
    return datetime.fromtimestamp(path.stat().st_mtime).isoformat()


def registry_class(name: str) -> type[ModelBenchmark] | None:
    """The registry's model for a name in a report: display, short or class name, any case or punctuation."""
    def plain(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower()).removesuffix("benchmark")

    wanted = plain(name)
    return next((c for c in MODEL_REGISTRY if wanted in {plain(c.MODEL_NAME), plain(c.SHORT_NAME), plain(c.__name__)}),
                None)


SPEC_NUMBERS = ("load_time_sec", "avg_inference_sec", "std_inference_sec", "min_inference_sec", "max_inference_sec",
                "fps_avg", "fps_std", "mem_before_mb", "mem_after_load_mb", "mem_peak_mb", "mem_after_cleanup_mb",
                "total_params", "total_layers_dissected", "input_size")
SPEC_LAYOUT_NOTE = ("rows in the spec's layout: image names, preprocessing and postprocessing times, per-run memory "
                    "and the machine's details are not in them; images are numbered in their order, run 1 is cold")


def report_row(raw: Any, index: int, path: Path, notes: list[str]) -> dict | None:
    """One row of a report: this program's as it is; the spec's layout (no class_name, no status)
    mapped to the registry, as ok, its samples split by image (cold first); None when left out."""
    names = [n for n in (raw.get("class_name"), raw.get("model_name")) if isinstance(n, str)] if isinstance(raw, dict) else []
    if not names:
        raise UsageError(f"{path} is not a benchmark report: result {index} names no model_name")
    if isinstance(raw.get("class_name"), str) and isinstance(raw.get("status"), str):
        return raw
    cls = next(filter(None, map(registry_class, names)), None)
    if cls is None:
        notes.append(f"model {names[-1]!r} is not one of this program's models: its row was left out")
        return None
    runs = spec_samples(raw, cls, notes)
    warm = [r["inference_sec"] for r in runs if r["run"] > 1]
    if SPEC_LAYOUT_NOTE not in notes:
        notes.append(SPEC_LAYOUT_NOTE)
    derived = {"runs": runs, "cold_inference_sec": runs[0]["inference_sec"] if runs else None,
               "warm_samples": len(warm), "warm_median_sec": float(np.median(warm)) if warm else None}
    numbers = {k: v for k, v in raw.items() if k in SPEC_NUMBERS}
    return {**derived, **{k: v for k, v in raw.items() if k not in SPEC_NUMBERS},
            **{k: v if isinstance(v, (int, float)) and math.isfinite(v) else None for k, v in numbers.items()},
            "reported_model_name": names[-1], "model_name": cls.MODEL_NAME, "class_name": cls.__name__,
            "short_name": cls.SHORT_NAME, "status": raw.get("status") if isinstance(raw.get("status"), str) else "ok"}


def spec_samples(raw: dict, cls: type[ModelBenchmark], notes: list[str]) -> list[dict]:
    """inference_times_sec split into images of num_runs_per_image runs (or the samples over
    num_images), by position; entries that are not numbers are dropped after numbering, noted."""
    if isinstance(raw.get("runs"), list):
        return raw["runs"]
    times = raw.get("inference_times_sec")
    if not isinstance(times, list) or not times:
        notes.append(f"{cls.MODEL_NAME}: no inference_times_sec list: averages only, no samples to test against")
        return []
    per_image = raw.get("num_runs_per_image")
    if not (isinstance(per_image, int) and per_image > 0):
        images = raw.get("num_images")
        per_image = len(times) // images if isinstance(images, int) and images > 0 and len(times) % images == 0 else len(times)
        notes.append(f"{cls.MODEL_NAME}: no usable num_runs_per_image: {per_image} run(s) per image assumed")
    runs = [{"image": f"image {i // per_image + 1}", "run": i % per_image + 1, "inference_sec": float(t)}
            for i, t in enumerate(times) if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)]
    if len(runs) < len(times):
        notes.append(f"{cls.MODEL_NAME}: {len(times) - len(runs)} sample(s) that are not numbers left out")
    return runs


class HistoryStore:
    """Every run remembered in SQLite (WAL): runs, per-model results, raw samples, verdicts."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=HISTORY_LOCK_TIMEOUT_SEC)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise OutputError(f"history store {path} cannot be used ({e}): {history_advice(str(e))}") from e

    def size(self) -> dict:
        """The history's size: its runs, and its bytes on disk (with the WAL file beside it)."""
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        size_bytes = sum(f.stat().st_size for f in files if f.exists())
        runs = self.db.execute("SELECT count(*) FROM runs").fetchone()[0]
        return {"history_runs": runs, "history_mb": round(size_bytes / 2**20, 3)}

    def prune(self, keep_runs: int) -> int:
        """--history-keep-runs: delete every run older than the newest keep_runs, with its results,
        samples and verdicts, in one transaction (all or nothing); returns how many were deleted."""
        doomed = [r[0] for r in self.db.execute("SELECT run_id FROM runs ORDER BY started_at DESC, rowid DESC "
                                                 "LIMIT -1 OFFSET ?", (keep_runs,))]
        with self.db:
            for table in ("verdicts", "samples", "model_results", "runs"):
                self.db.executemany(f"DELETE FROM {table} WHERE run_id=?", [(run_id,) for run_id in doomed])
        if doomed:  # freed pages are reused by later runs; a checkpoint keeps the WAL file from growing
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return len(doomed)

    def _migrate(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            with self.db:
                self.db.executescript(HISTORY_SCHEMA_V1)
                self.db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        version = self.schema_version()
        if version > HISTORY_SCHEMA_VERSION:
            raise OutputError(f"history store {self.path} has schema {version}, written by a newer vision-bench "
                              f"(this one reads up to {HISTORY_SCHEMA_VERSION}): upgrade, or pass --history PATH")
        if version < HISTORY_SCHEMA_VERSION:
            self._upgrade()

    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    def _upgrade(self) -> None:
        """Every migration step in one write transaction, taken before the version is read again:
        two runs opening an old history at once upgrade it once (the second waits, then finds it done)."""
        self.db.isolation_level = None  # the transaction is ours: DDL and DML in one BEGIN ... COMMIT
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for step in range(self.schema_version() + 1, HISTORY_SCHEMA_VERSION + 1):
                    for statement in filter(str.strip, HISTORY_MIGRATIONS[step].split(";")):
                        self.db.execute(statement)
                    self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(step),))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        finally:
            self.db.isolation_level = ""

    def close(self) -> None:
        self.db.close()

    def has_run(self, run_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is not None

    def add_run(self, payload: dict, source: str) -> bool:
        """Store a run with its raw samples; False when the run id is already there."""
        if self.has_run(payload["run_id"]):
            return False
        env, run_id = payload["environment"], payload["run_id"]
        with self.db:
            self.db.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?)",
                            (run_id, payload["started_at"], payload.get("timestamp"), payload["machine_key"],
                             env.get("hostname"), json.dumps(env), int(bool(payload.get("complete"))), source))
            for row in payload["results"]:
                self._add_result(run_id, payload, row)
        return True

    def _add_result(self, run_id: str, payload: dict, row: dict) -> None:
        config, machine, backend = model_config(payload, row), row_machine_key(payload, row), row_backend(row)
        slim = {k: v for k, v in row.items() if k != "runs"}
        self.db.execute(
            "INSERT INTO model_results (run_id, class_name, backend, machine_key, model_name, config_key, config, status, "
            "noisy, load_time_sec, runtime_init_sec, download_sec, cold_inference_sec, warm_median_sec, mem_peak_mb, "
            "rss_peak_mb, cuda_peak_allocated_mb, total_params, input_shape, row) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (run_id, row["class_name"], backend, machine, row.get("model_name"), short_hash(config), json.dumps(config),
             row["status"],
             int(bool(row.get("noisy"))), row.get("load_time_sec"), row.get("runtime_init_sec"), row.get("download_sec"),
             row.get("cold_inference_sec"), row.get("warm_median_sec"), row.get("mem_peak_mb"), row.get("rss_peak_mb"),
             row.get("cuda_peak_allocated_mb"), row.get("total_params"), json.dumps(row.get("input_shape")),
             json.dumps(slim, default=str)))
        self.db.executemany(
            "INSERT OR IGNORE INTO samples (run_id, class_name, backend, machine_key, image, run, inference_sec, "
            "preprocess_sec, postprocess_sec, peak_mb, input_shape) VALUES (?,?,?,?,?,?,?,?,?,?,?)", [
                (run_id, row["class_name"], backend, machine, r["image"], r["run"], r["inference_sec"],
                 r.get("preprocess_sec"), r.get("postprocess_sec"), r.get("peak_mb"), json.dumps(r.get("input_shape")))
                for r in row.get("runs", [])])

    def earlier(self, payload: dict, row: dict) -> list[dict]:
        """Earlier ok runs of this model with the same machine, backend and configuration, most recent
        first; never an incomplete run (stopped, interrupted or recovered from a dead run's journal)."""
        config_key, ident = short_hash(model_config(payload, row)), self.identity(payload, row)
        found = self.db.execute(
            "SELECT m.run_id, m.row, r.environment, r.started_at FROM model_results m JOIN runs r USING (run_id) "
            "WHERE m.config_key=? AND m.class_name=? AND m.backend=? AND m.machine_key=? AND r.started_at<? "
            "AND m.status='ok' AND r.complete=1 ORDER BY r.started_at DESC", (config_key, *ident, payload["started_at"]))
        runs = []
        for rec in found:
            earlier = json.loads(rec["row"])
            earlier["runs"] = self.samples(rec["run_id"], *ident)
            earlier.update(run_id=rec["run_id"], started_at=rec["started_at"], environment=json.loads(rec["environment"]),
                           verdicts=self.verdicts(rec["run_id"], *ident))
            runs.append(earlier)
        return runs

    @staticmethod
    def identity(payload: dict, row: dict) -> tuple[str, str, str]:
        """A row's key in the tables beside its run id: class, backend, machine."""
        return row["class_name"], row_backend(row), row_machine_key(payload, row)

    def samples(self, run_id: str, class_name: str, backend: str, machine: str) -> list[dict]:
        rows = self.db.execute("SELECT image, run, inference_sec, preprocess_sec, postprocess_sec, peak_mb, input_shape "
                               "FROM samples WHERE run_id=? AND class_name=? AND backend=? AND machine_key=? ORDER BY rowid",
                               (run_id, class_name, backend, machine))
        return [{**dict(r), "input_shape": json.loads(r["input_shape"] or "null")} for r in rows]

    def verdicts(self, run_id: str, class_name: str, backend: str, machine: str) -> dict[str, str]:
        rows = self.db.execute("SELECT metric, verdict FROM verdicts WHERE run_id=? AND class_name=? AND backend=? "
                               "AND machine_key=?", (run_id, class_name, backend, machine))
        return {r["metric"]: r["verdict"] for r in rows}

    def add_verdicts(self, run_id: str, verdicts: list[dict]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO verdicts (run_id, class_name, backend, machine_key, metric, verdict, baseline, "
                "now, ratio, p_value, threshold, baseline_runs, detail) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", [
                    (run_id, v["class_name"], v.get("backend", "torch"), v["machine_key"], v["metric"], v["verdict"],
                     v.get("baseline"), v.get("now"), v.get("ratio"), v.get("p_value"), v.get("threshold"),
                     v.get("baseline_runs"),
                     json.dumps({"notes": v.get("notes", []), "env_changes": v.get("env_changes", [])}))
                    for v in verdicts])

    def payload(self, run_id: str) -> dict | None:
        """A stored run in the shape of a report payload (for --compare by run id)."""
        run = self.db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if run is None:
            return None
        results = []
        for rec in self.db.execute("SELECT class_name, backend, machine_key, row FROM model_results WHERE run_id=? "
                                   "ORDER BY rowid", (run_id,)):
            results.append({**json.loads(rec["row"]),
                            "runs": self.samples(run_id, rec["class_name"], rec["backend"], rec["machine_key"])})
        return {"run_id": run_id, "timestamp": run["timestamp"], "started_at": run["started_at"],
                "machine_key": run["machine_key"], "environment": json.loads(run["environment"]), "results": results}

    def wall_times(self, config_key: str, class_name: str, machine: str, dissect_mode: str | None,
                   limit: int) -> list[float]:
        """The whole-model wall times of this model's latest complete ok runs in this configuration
        that dissected as this run will (a dissection is part of the wall time, not of the key)."""
        found = self.db.execute(
            "SELECT m.row FROM model_results m JOIN runs r USING (run_id) WHERE m.config_key=? AND m.class_name=? "
            "AND m.machine_key=? AND m.status='ok' AND r.complete=1 ORDER BY r.started_at DESC",
            (config_key, class_name, machine))
        rows = (json.loads(rec["row"]) for rec in found)
        walls = [row["model_wall_sec"] for row in rows
                 if row.get("model_wall_sec") is not None and row.get("dissect_mode") == dissect_mode]
        return walls[:limit]

    def trend(self, payload: dict, row: dict) -> list[dict]:
        """This model's earlier runs in this configuration, oldest first, with their warm verdicts (plots)."""
        config_key = short_hash(model_config(payload, row))
        found = self.db.execute(
            "SELECT m.run_id, m.warm_median_sec, r.started_at, v.verdict, v.baseline, v.threshold FROM model_results m "
            "JOIN runs r USING (run_id) LEFT JOIN verdicts v ON v.run_id=m.run_id AND v.class_name=m.class_name "
            "AND v.backend=m.backend AND v.machine_key=m.machine_key AND v.metric='warm latency' WHERE m.config_key=? "
            "AND m.class_name=? AND m.backend=? AND m.machine_key=? AND m.status='ok' AND r.started_at<? "
            "ORDER BY r.started_at", (config_key, *self.identity(payload, row), payload["started_at"]))
        return [dict(r) for r in found]


PARITY_RANK = {"reference": 0, "exact": 0, "ok": 0, "drift": 1, "broken": 2}  # exact <-> ok is no change


def parity_change(row: dict, before: dict) -> dict | None:
    """'parity changed' when the accuracy verdict is worse than in the latest earlier run of the
    same configuration (a library upgrade that changed the numerics)."""
    now, then = row.get("parity"), before.get("parity")
    if now not in PARITY_RANK or then not in PARITY_RANK or PARITY_RANK[now] <= PARITY_RANK[then]:
        return None
    return {"metric": "accuracy", "verdict": "parity changed", "baseline": before.get("parity_rel_l2_max"),
            "now": row.get("parity_rel_l2_max"), "detail": f"{then} -> {now}"}


def judge_model(row: dict, earlier: list[dict], environment: dict) -> list[dict]:
    """Every verdict for one model of this run against its earlier runs (most recent first)."""
    previous = earlier[0]["verdicts"] if earlier else {}

    def usable(metric: str) -> list[dict]:  # a pending suspicion is not a baseline
        return [e for e in earlier if e["verdicts"].get(metric) != "suspicious"]

    verdicts = [
        {"metric": "warm latency", **warm_verdict(warm_samples(row), [warm_samples(e) for e in usable("warm latency")],
                                                  previous.get("warm latency"))},
        {"metric": "cold start", **cold_verdict(row.get("cold_inference_sec"),
                                                [e.get("cold_inference_sec") for e in usable("cold start")],
                                                previous.get("cold start"))},
        {"metric": "memory peak", **memory_verdict(row.get("mem_peak_mb"), [e.get("mem_peak_mb") for e in usable("memory peak")],
                                                   previous.get("memory peak"))},
    ]
    if earlier:
        for metric, key in (("parameters", "total_params"), ("input shape", "input_shape")):
            if earlier[0].get(key) != row.get(key):
                verdicts.append({"metric": metric, "verdict": "changed", "baseline": None, "now": None,
                                 "detail": f"{earlier[0].get(key)} -> {row.get(key)}"})
    if earlier and (changed := parity_change(row, earlier[0])):
        verdicts.append(changed)
    verdicts += drift_verdicts(row, earlier, {v["metric"]: v["verdict"] for v in verdicts})
    changes = environment_changes(environment, earlier[0]["environment"] if earlier else None)
    notes = [f"this run was noisy: {'; '.join(row.get('noise_reasons', []))}"] if row.get("noisy") else []
    return [{"model_name": row_name(row), "class_name": row["class_name"], "backend": row_backend(row), **v,
             "env_changes": changes, "notes": notes} for v in verdicts]


def expected_wall_times(cfg: RunConfig, machine: str) -> dict[str, float]:
    """Each model's expected wall time in this run (time left): the median of its last
    ETA_HISTORY_RUNS complete ok runs with this machine and configuration; none there, not in
    the dict. Read only; a history that cannot be read gives no estimates (judging says why)."""
    if not cfg.history or not Path(cfg.history).is_file():
        return {}
    fields, found = config_fields(cfg), {}
    try:
        store = HistoryStore(Path(cfg.history))
        try:
            for cls, backend in cfg.units:
                job = cfg.job(cls, backend)
                row = {"class_name": cls.__name__, "input_size": cls.INPUT_SIZE, "device": fields["device"],
                       "runtime": backend}
                if walls := store.wall_times(short_hash(model_config(fields, row)), cls.__name__, machine,
                                             job.dissect_mode if job.dissect else None, ETA_HISTORY_RUNS):
                    found[run_key(cls.__name__, backend)] = float(np.median(walls))
        finally:
            store.close()
    except (BenchError, sqlite3.Error, OSError):
        return {}
    return found


def history_advice(error: str) -> str:
    """What to do about a history file SQLite refused, by its message."""
    if "locked" in error:
        return (f"another process held it for over {HISTORY_LOCK_TIMEOUT_SEC:g}s (a run or a reader of the same "
                f"file): run again when it is done, or pass --history PATH or --no-history")
    if "readonly" in error or "read-only" in error:
        return "it, or its folder, cannot be written: make both writable, or pass --history PATH or --no-history"
    return "move it aside, or pass --history PATH or --no-history"


def import_reports(store: HistoryStore, folder: Path) -> tuple[int, int]:
    """Load benchmark_results_*.json files into the history, idempotent by run id: (added, already there)."""
    if not folder.is_dir():
        raise UsageError(f"--import-reports {folder}: not a folder")
    added = present = 0
    unreadable = []
    for path in sorted(folder.glob("benchmark_results_*.json")):
        try:
            payload = read_report(path)
            stored = store.add_run(payload, f"import:{path}")
        except (UsageError, sqlite3.Error) as e:
            log(f"Not imported: {path}: {e}", "WARNING")
            unreadable.append(path.name)
            continue
        added, present = added + stored, present + (not stored)
    if unreadable:
        raise UsageError(f"--import-reports {folder}: imported {added} ({present} already there); {len(unreadable)} "
                         f"file(s) are not reports and were left out: {', '.join(unreadable)}")
    return added, present


def read_report(path: Path) -> dict:
    """payload_from_report, with what it could not take from the file on the console; a file
    whose values this program cannot use is a usage error naming it."""
    try:
        payload = payload_from_report(path)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"{path} is not a report this program can read ({type(e).__name__}: {e})") from None
    for note in payload["import_notes"]:
        log(f"{path.name}: {note}", "IMPORT")
    return payload


# --------------------------------------------------------------------------------------
# Reports and plots
# --------------------------------------------------------------------------------------

SPEC_CSV_COLUMNS = [
    "model_name", "load_time_sec", "avg_inference_sec", "std_inference_sec",
    "min_inference_sec", "max_inference_sec", "fps_avg", "fps_std",
    "mem_peak_mb", "total_params", "total_layers_dissected",
    "num_images", "num_runs_per_image", "device",
]
EXTRA_CSV_COLUMNS = [
    "class_name", "status", "isolation", "import_sec", "runtime_init_sec", "download_sec", "downloaded",
    "module_calls_before_cold_run", "cold_inference_sec", "warm_samples", "warm_median_sec", "warm_p90_sec",
    "warm_p99_sec", "warm_iqr_rel", "noisy", "noise_reasons", "other_cpu_cores", "load_avg_1min",
    "preprocess_avg_sec", "postprocess_avg_sec", "mem_kind", "mem_before_mb", "mem_after_load_mb",
    "mem_after_cleanup_mb", "mem_not_returned_mb", "rss_peak_mb", "cuda_peak_allocated_mb", "leaf_modules",
    "input_size", "input_shape", "images", "weights", "weights_source", "dissect_mode", "dissect_status", "dissect_time_sec",
    "dissect_bytes_written", "failed_phase", "failed_image", "worker_signal", "error",
    "dtype", "channels_last", "compile_mode", "fuse", "threads", "interop_threads", "cpu_affinity", "compile_sec",
    "recompilations", "gflops", "achieved_tflops", "peak_tflops", "mfu", "energy_j_per_inference", "power_mean_w",
    "warm_median_event_sec", "compile_calls", "peak_precision", "checkpoint_dtype", "weights_dtype", "nvml",
    "gpu_own_process", "layer_timing", "parity", "parity_thresholds", "parity_rel_l2_max", "parity_max_abs",
    "parity_nonfinite", "parity_agreement", "parity_note", "parity_first_drift", "reference_sec",
    "parity_recompilations", "model_wall_sec", "runtime", "runtime_version", "runtime_device", "torch_load_sec",
    "export_sec", "export_mb", "export_cached", "export_exporter", "export_opset", "baseline_backend",
    "speedup_vs_baseline", "runtime_cpu_nodes", "engine_build_sec", "engine_cached",
]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Everything about the machine a figure depends on."""
    return {
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        **cuda_environment(device),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "transformers": package_version("transformers"),
        "ultralytics": package_version("ultralytics"),
        **{name: package_version(name) for name in ("onnx", "onnxruntime", "openvino")},  # None: not installed
        "device": str(device),
        "random_seed": RANDOM_SEED,
    }


def report_payload(outcome: RunOutcome, cfg: RunConfig, total_time_sec: float, env: dict | None = None) -> dict:
    """The JSON report's content (env: the machine as the run saw it, else as it is now)."""
    env = env or environment(cfg.device)
    return {
        "run_id": cfg.run_id,
        "started_at": cfg.started_at,
        "machine_key": machine_key(env),
        "timestamp": cfg.timestamp,
        "total_execution_time_sec": total_time_sec,
        "random_seed": RANDOM_SEED,
        "complete": outcome.complete,
        "interrupted_by": outcome.interrupted_by,
        "image_source": cfg.image_source,
        "images": [str(p) for p in cfg.images],
        **config_fields(cfg),
        "dissect_mode": cfg.dissect_mode if cfg.dissect else None,
        "model_timeout_sec": cfg.model_timeout_sec,
        "history_keep_runs": cfg.history_keep_runs,
        "options_as_run": asdict(cfg.options),
        "backends": cfg.backends,
        **cfg.executor_info,
        "environment": env,
        "results": with_speedups(outcome.results, cfg.backends),
    }


def with_speedups(rows: list[dict], backends: list[str]) -> list[dict]:
    """Each ok row's speed-up against the first backend's row of the same model (and node): that
    row's warm median over this one's (2.0: twice as fast). None where either has no warm median."""
    def model_on_node(row: dict) -> str:
        return run_key(row["class_name"], node_label=row.get("node_label"))

    baseline = {model_on_node(r): r.get("warm_median_sec")
                for r in rows if r["status"] == "ok" and row_backend(r) == backends[0]}
    for row in rows:
        base = baseline.get(model_on_node(row))
        now = row.get("warm_median_sec") if row["status"] == "ok" else None
        row["baseline_backend"] = backends[0]
        row["speedup_vs_baseline"] = base / now if base and now else None
    return rows


def csv_value(value: Any) -> Any:
    """One CSV cell: empty for None, lists of text joined with '; ', mappings as JSON."""
    if value is None or value == []:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return "; ".join(value) if isinstance(value, list) and isinstance(value[0], str) else value


def csv_text(results: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SPEC_CSV_COLUMNS + EXTRA_CSV_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in results:
        writer.writerow({k: csv_value(row.get(k)) for k in writer.fieldnames})
    return buf.getvalue()


def md_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, line breaks as <br>."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    return lines + ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows] + [""]


def noisy_mark(row: dict, value: str) -> str:
    """A figure as written in the Markdown: marked when its model's runs were noisy."""
    return f"{value} (noisy)" if row.get("noisy") else value


def shape_text(shape: list[int] | None) -> str:
    return "x".join(map(str, shape or [])) or "n/a"


def na(value: Any, spec: str = ".3f") -> str:
    """A figure, or n/a where it cannot be had (never 0)."""
    return "n/a" if value is None else format(value, spec)


def compute_markdown(ok: list[dict]) -> list[str]:
    """Options as run and compute figures per model."""
    return ["## Deployment and Compute", "",
            "FLOPs: one eager forward counted by torch's FlopCounterMode (matmuls, convolutions, attention; "
            "element-wise ops are not counted). Achieved TFLOP/s = the first image's FLOPs / its own warm "
            "median. MFU against the peak of the FLOP mix, convolutions and matrix products each at the dense "
            "peak of the precision they ran in (TF32 where torch's flags allow it); n/a on the CPU, MIG slices "
            "and unknown devices. Energy: NVIDIA GPUs with nvidia-ml-py only.", ""] + table(
        ["Model", "dtype", "Channels-last", "Compile", "Fuse", "Threads", "Compile (s)", "Compile calls",
         "Recompilations", "GFLOPs", "TFLOP/s", "Peak", "MFU", "J/inference", "Mean W", "Warm median by CUDA events (s)"],
        [[row_name(r), r.get("dtype"), r.get("channels_last"), r.get("compile_mode") or "eager", r.get("fuse"),
          r.get("threads"), na(r.get("compile_sec"), ".2f"), na(r.get("compile_calls"), "d"),
          na(r.get("recompilations"), "d"), na(r.get("gflops"), ".2f"), na(r.get("achieved_tflops"), ".3f"),
          f"{r['peak_tflops']:.1f} ({r.get('peak_precision')})" if r.get("peak_tflops") else "n/a", na(r.get("mfu"), ".2%"),
          na(r.get("energy_j_per_inference"), ".4f"), na(r.get("power_mean_w"), ".0f"),
          na(r.get("warm_median_event_sec"))] for r in ok])


def parity_text(row: dict) -> str:
    """A row's accuracy verdict as the report writes it."""
    verdict = row.get("parity")
    if verdict is None:
        return "n/a (not checked)"
    if verdict == "failed":
        return f"n/a: {row.get('parity_error')}"
    return "reference (fp32 eager)" if verdict == "reference" else f"{verdict} ({row.get('parity_thresholds')} thresholds)"


def accuracy_markdown(ok: list[dict]) -> list[str]:
    """The Accuracy cost block: each variant against the fp32 eager reference, then where its error grows."""
    limits = "; ".join(f"{name}: relative error <= {t['rel_l2']:g} and task agreement >= {t['agreement']:g}"
                       for name, t in PARITY_THRESHOLDS.items())
    md = ["## Accuracy cost", "",
          "Each variant (--dtype, --fuse, --channels-last, --compile) against a fresh fp32 eager instance of the same "
          "model and weights, on every image, outside the timed runs (Reference = its time); the worst image is "
          "shown. Relative error: ||variant - reference|| / ||reference|| of the raw forward outputs. Task "
          "agreement: detection F1 (boxes matched by class at IoU >= 0.5; segment: also mask IoU), depth: pixels "
          "within a ratio of 1.25, MobileSAM: mask IoU. n/a (no detections): neither output holds a detection "
          f"above the confidence threshold, so there is nothing to agree on. ok: {limits}; broken: non-finite "
          f"values or agreement below {PARITY_BROKEN_AGREEMENT}; exact: bitwise equal.", ""]
    md += table(["Model", "Verdict", "Worst relative error", "Max abs error", "Task agreement", "Task figures",
                 "First drifting layer", "Reference (s)"],
                [[row_name(r), parity_text(r), na(r.get("parity_rel_l2_max"), ".2e"), na(r.get("parity_max_abs"), ".2e"),
                  r.get("parity_note") or na(r.get("parity_agreement"), ".3f"), task_figures_text(r.get("parity_task")),
                  first_drift_text(r), na(r.get("reference_sec"), ".2f")] for r in ok])
    for r in (r for r in ok if r.get("parity_growth_top")):
        md += [f"Where the error of {row_name(r)} grows most (output error over input error, "
               f"{r['parity_layers_compared']} outputs compared on the first image):", ""] + table(
            ["Module", "Call", "Type", "Output error", "Input error", "Growth"],
            [[g["name"], g["call"], g["type"], na(g["rel_err"], ".2e"), na(g["in_rel_err"], ".2e"),
              na(g["growth"], ".1f") if (g["in_rel_err"] is None or g["in_rel_err"] >= PARITY_GROWTH_FLOOR) else "all of it (exact input)"]
             for g in r["parity_growth_top"]])
    return md


def runtime_markdown(ok: list[dict]) -> list[str]:
    """The Runtime block (--backend): what ran the forward, its export and its session."""
    rows = [r for r in ok if r.get("runtime", "torch") != "torch"]
    if not rows:
        return []
    return ["## Runtime", "",
            "The forward exported to ONNX from the loaded PyTorch module and run by the runtime below. The export "
            "is its own phase, never a sample; the row's load time is the session's creation, the PyTorch module's "
            "load beside it. FLOPs are the PyTorch module's; dissection, where run, is of the PyTorch module; the "
            "process's memory includes the PyTorch module, kept for the FLOPs, the accuracy check and dissection. "
            "Nodes: where ONNX Runtime placed the graph's nodes; on a GPU, those left on the CPU are host work inside "
            "the row's figures. TensorRT's engine build (one call per input shape) is before the samples.", ""] + table(
        ["Model", "Runtime", "Device", "Settings", "Export", "Export (MB)", "Export (s)", "Session (s)", "PyTorch load (s)",
         "Nodes", "Engine build (s)"],
        [[row_name(r), f"{r['runtime']} {r.get('runtime_version')}", r.get("runtime_device"),
          ", ".join(f"{k}={v}" for k, v in (r.get("runtime_settings") or {}).items()),
          f"{r.get('export_exporter')} exporter, opset {r.get('export_opset')}" + (" (cached)" if r.get("export_cached") else "")
          + "".join(f"; {r[k]}" for k in ("export_fallback", "export_note") if r.get(k)),
          fmt(r.get("export_mb"), ".1f"), fmt(r.get("export_sec"), ".2f"), fmt(r.get("load_time_sec"), ".2f"),
          fmt(r.get("torch_load_sec"), ".2f"), placement_text(r),
          fmt(r.get("engine_build_sec"), ".2f") + (" (cached)" if r.get("engine_cached") else "")] for r in rows])


def placement_text(row: dict) -> str:
    """The Runtime block's Nodes cell: node_placement_text, the nodes left on the CPU in bold."""
    placed, on_cpu = node_placement_text(row)
    return (placed or "n/a") + (f"; **left on the CPU: {on_cpu}**" if on_cpu else "")


def backends_markdown(ok: list[dict], backends: list[str]) -> list[str]:
    """Several backends (--backend LIST): each model's rows side by side, speed-ups against the first."""
    if len(backends) < 2:
        return []
    order = {b: i for i, b in enumerate(backends)}
    rows = sorted(ok, key=lambda r: (r["model_name"], r.get("node_label") or "", order.get(row_backend(r), len(order))))
    return ["## Backends", "",
            f"Each model once per backend, in the order given; speed-up: the {backends[0]} row's warm median over "
            f"this row's (above 1: faster than {backends[0]}). Accuracy: against the fp32 PyTorch reference.", ""] + table(
        ["Model", "Backend", "Warm median (s)", f"Speed-up vs {backends[0]}", "Cold (s)", "Load (s)", "Export (s)",
         "Export (MB)", "CPU nodes", "Accuracy"],
        [[r["model_name"] + (f" @ {r['node_label']}" if r.get("node_label") else ""), row_backend(r),
          noisy_mark(r, fmt(r["warm_median_sec"])), fmt(r.get("speedup_vs_baseline"), ".2f") + "x"
          if r.get("speedup_vs_baseline") else "n/a", fmt(r["cold_inference_sec"]), fmt(r["load_time_sec"], ".2f"),
          fmt(r.get("export_sec"), ".2f"), fmt(r.get("export_mb"), ".1f"),
          "-" if r.get("runtime_cpu_nodes") is None else str(r["runtime_cpu_nodes"]), parity_text(r)] for r in rows])


def task_figures_text(task: dict | None) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in (task or {}).items()
                     if k not in ("agreement", "note") and v is not None) or "-"


def first_drift_text(row: dict) -> str:
    if row.get("parity_layer_note"):
        return row["parity_layer_note"]
    if "parity_first_drift" not in row:
        return "not compared (--parity-layers or dissection)" if row.get("parity") not in (None, "reference", "failed") else "-"
    drift = row["parity_first_drift"]
    return f"{drift['name']} (call {drift['call']}, {na(drift['rel_err'], '.2e')})" if drift else f"none above {row['parity_layer_limit']:g}"


def devices_text(payload: dict) -> str:
    """The device(s) the models ran on: each row's own (on a Ray cluster each node has its own), else the run's."""
    seen = collections.Counter(str(r["device"]) for r in payload["results"] if r["status"] == "ok" and r.get("device"))
    if not seen or set(seen) == {payload["environment"]["device"]}:
        return payload["environment"]["device"]
    return ", ".join(f"{d} ({n} model{'s' if n > 1 else ''})" for d, n in seen.most_common())


def memory_kind_text(results: list[dict], device: torch.device) -> str:
    """What the memory figures are: CUDA allocated memory for rows run on CUDA, process RSS for CPU rows."""
    kinds = {r["mem_kind"] for r in results if r["status"] == "ok" and r.get("mem_kind")}
    kinds = kinds or {"cuda_allocated" if device.type == "cuda" else "process_rss"}
    if len(kinds) > 1:
        return "CUDA allocated memory for the models run on CUDA, process RSS for those run on CPU (Kind below)"
    return "CUDA allocated memory" if kinds == {"cuda_allocated"} else "process RSS"


def markdown_text(payload: dict, cfg: RunConfig) -> str:
    env, results = payload["environment"], payload["results"]
    ok = [r for r in results if r["status"] == "ok"]
    md = ["# Vision Model Benchmark Report", "", f"**Timestamp:** {cfg.timestamp}", ""]
    if not payload["complete"]:
        md += [f"**INCOMPLETE RUN** (interrupted by {payload['interrupted_by'] or 'a failure'}): "
               "only the models listed as ok finished.", ""]
    if payload.get("recovered"):
        lost = payload["recovered"]["lost"]
        md += [f"Recovered on {payload['recovered']['recovered_at']} from the progress journal of a run that died "
               "before writing its reports. Lost: " + ("; ".join(lost) if lost else "nothing") + ".", ""]
    md += ["## System Information", ""] + table(["Property", "Value"], [
        ["OS", env["os"]], ["Python", env["python"]], ["PyTorch", env["torch"]],
        ["CUDA Available", env["cuda_available"]], ["CUDA Version", env["cuda_version"]],
        ["cuDNN Version", env["cudnn_version"]], ["GPU", env["gpu_name"]], ["CPU", env["cpu_model"]],
        ["Torch Threads", env["torch_threads"]], ["transformers", env["transformers"]],
        ["ultralytics", env["ultralytics"]], ["Device", devices_text(payload)], ["Random Seed", RANDOM_SEED]])
    timeout = f"{cfg.model_timeout_sec:g}s per model" if cfg.model_timeout_sec else "none"
    md += ["## Benchmark Configuration", "",
           f"- Weights: **{cfg.weights}**" + (" (seeded random initialisation: timings are real, outputs are not)"
                                              if cfg.weights == "random" else ""),
           f"- Test Images: {len(cfg.images)} from {cfg.image_source}: " + ", ".join(p.name for p in cfg.images),
           f"- Inference Runs per Image: {cfg.runs} (no warm-up: run 1 of each image is its cold run, "
           "runs 2..N are warm)",
           f"- Total Inference Runs per Model: {len(cfg.images) * cfg.runs}",
           f"- Isolation: **{cfg.isolation}**" + (" (each model in a fresh worker process)" if cfg.isolation == "process"
                                                  else " (all models in one process: cold starts depend on the order)"),
           f"- Model timeout: {timeout}",
           f"- Deployment options: {options_text(cfg.options, cfg.backends)} (threads as run: see below)",
           f"- Total Execution Time: {payload['total_execution_time_sec']:.2f}s",
           "- Timing: the forward pass alone, perf_counter with CUDA synchronisation; preprocessing and "
           "postprocessing are timed separately below.",
           f"- Memory: {memory_kind_text(results, cfg.device)}; the peak is "
           "the true peak of each run (peak counters reset before every run).", ""]
    md += ["## Results", ""] + table(
        ["Model", "Load Time (s)", "Avg Inference (s)", "Std (s)", "FPS", "Peak Memory (MB)", "Parameters", "Layers"],
        [[row_name(r), fmt(r["load_time_sec"], ".2f"), noisy_mark(r, fmt(r["avg_inference_sec"])),
          fmt(r["std_inference_sec"]), fmt(r["fps_avg"], ".2f"), fmt(r["mem_peak_mb"], ".0f"),
          f"{r['total_params']:,}", r["total_layers_dissected"]] for r in ok])
    md += ["## Phases (s)", "",
           "Each in the model's own worker, in this order; the cold run comes after all of them. Module calls "
           "before the cold run must be 0: no forward of the model warms it. The wall time is the whole model, "
           "as this run's runner saw it: worker start, every phase, dissection and the accuracy check.", ""] + table(
        ["Model", "Imports", "Runtime init", "Download", "Load", "Module calls before cold run", "Wall, whole model"],
        [[row_name(r), fmt(r["import_sec"], ".2f"), fmt(r["runtime_init_sec"]),
          fmt(r["download_sec"], ".2f") + (" (downloaded)" if r["downloaded"] else ""), fmt(r["load_time_sec"], ".2f"),
          r["module_calls_before_cold_run"], fmt(r.get("model_wall_sec"), ".1f")] for r in ok])
    md += ["## Latency Detail", "",
           "Warm percentiles come from warm runs only; n/a where the samples cannot support them "
           f"(p90 needs {PERCENTILE_MIN_SAMPLES[90]}, p99 {PERCENTILE_MIN_SAMPLES[99]} warm runs).", ""] + table(
        ["Model", "Cold (s)", "Warm median (s)", "Warm p90 (s)", "Warm p99 (s)", "Warm runs", "Warm IQR/median",
         "Preprocess (s)", "Postprocess (s)", "Input shape"],
        [[row_name(r), fmt(r["cold_inference_sec"]), noisy_mark(r, fmt(r["warm_median_sec"])),
          fmt(r["warm_p90_sec"]), fmt(r["warm_p99_sec"]), r["warm_samples"], fmt(r["warm_iqr_rel"], ".1%"),
          fmt(r["preprocess_avg_sec"]), fmt(r["postprocess_avg_sec"]), shape_text(r["input_shape"])] for r in ok])
    md += compute_markdown(ok)
    md += accuracy_markdown(ok)
    md += runtime_markdown(ok)
    md += backends_markdown(ok, payload.get("backends") or ["torch"])
    varied = [r for r in ok if len({shape_text(i["input_shape"]) for i in r["per_image"]}) > 1]
    if varied:
        md += ["## Per-Image Latency", "", "Models whose input shape differs between images: each image's first "
               "run is a cold run for its shape.", ""] + table(
            ["Model", "Image", "Input shape", "Cold (s)", "Warm median (s)", "Warm runs", "Preprocess (s)",
             "Postprocess (s)"],
            [[row_name(r), i["image"], shape_text(i["input_shape"]), fmt(i["cold_sec"]), fmt(i["warm_median_sec"]),
              i["warm_samples"], fmt(i["preprocess_avg_sec"]), fmt(i["postprocess_avg_sec"])]
             for r in varied for i in r["per_image"]])
    md += ["## Noise", "", f"A model is flagged noisy when its warm IQR/median exceeds {NOISE_MAX_IQR_REL:.0%} or "
           f"other processes used more than {NOISE_MAX_OTHER_CORES} cores during its runs.", ""] + table(
        ["Model", "Load avg (1 min)", "Other processes (cores)", "Verdict"],
        [[row_name(r), fmt(r["load_avg_1min"], ".2f"), fmt(r["other_cpu_cores"], ".2f"),
          "NOISY: " + "; ".join(r["noise_reasons"]) if r["noisy"] else "quiet"] for r in ok])
    md += ["## Memory (MB)", "", "Against the worker's own baseline after runtime init.", ""] + table(
        ["Model", "Kind", "Baseline", "After load", "Peak", "After cleanup", "Not returned", "Peak RSS"],
        [[row_name(r), r["mem_kind"], fmt(r["mem_before_mb"], ".0f"), fmt(r["mem_after_load_mb"], ".0f"),
          fmt(r["mem_peak_mb"], ".0f"), fmt(r["mem_after_cleanup_mb"], ".0f"), fmt(r["mem_not_returned_mb"], "+.0f"),
          fmt(r["rss_peak_mb"], ".0f")] for r in ok])
    md += ["## Weights and Preprocessing", ""] + table(
        ["Model", "Weights", "Backend", "Preprocessing", "Notes"],
        [[row_name(r), r["weights_source"], r["backend"], r["preprocess_note"], "; ".join(r["notes"]) or "-"]
         for r in ok])
    others = [r for r in results if r["status"] != "ok"]
    if others:
        md += ["## Skipped and Failed Models", ""] + table(
            ["Model", "Status", "Phase", "Image", "Reason"],
            [[r["class_name"] + (f" @ {r['node_label']}" if r.get("node_label") else ""), r["status"],
              r.get("failed_phase") or "-", r.get("failed_image") or "-", r["error"]] for r in others])
        for r in others:
            if r.get("last_log_lines"):
                md += [f"Last output of {r['class_name']}'s worker:", "", "```"] + r["last_log_lines"] + ["```", ""]
    if ok:
        fastest = min(ok, key=lambda x: x["avg_inference_sec"])
        slowest = max(ok, key=lambda x: x["avg_inference_sec"])
        most_memory = max(ok, key=lambda x: x["mem_peak_mb"] or 0)
        most_params = max(ok, key=lambda x: x["total_params"])
        md += ["## Analysis", "",
               f"- **Fastest Model:** {fastest['model_name']} ({fastest['avg_inference_sec']:.3f}s, {fastest['fps_avg']:.2f} FPS)",
               f"- **Slowest Model:** {slowest['model_name']} ({slowest['avg_inference_sec']:.3f}s, {slowest['fps_avg']:.2f} FPS)",
               f"- **Most Memory Intensive:** {most_memory['model_name']} ({fmt(most_memory['mem_peak_mb'], '.0f')} MB)",
               f"- **Most Parameters:** {most_params['model_name']} ({most_params['total_params']:,})", ""]
        downloaded = [r["model_name"] for r in ok if r["downloaded"]]
        if downloaded:
            md += [f"- **Downloaded weights this run:** {', '.join(downloaded)} (download time is reported "
                   "apart and not counted in the load time)", ""]
    md += changes_markdown(payload)
    if payload.get("plots"):
        md += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in payload["plots"]] + [""]
    dissected = [r for r in ok if r.get("viz_dir")]
    md += ["## Visualizations", ""]
    if not dissected:
        md += ["Layer dissection was not run (--no-dissect).", ""]
    for r in dissected:
        rel = Path(os.path.relpath(r["viz_dir"], cfg.results_dir)).as_posix()
        md += [f"### {row_name(r)}", "",
               f"- Folder: [`{rel.removeprefix('../')}/`]({rel}/) ({r['total_layers_dissected']} layer "
               f"outputs, {format_bytes(r['dissect_bytes_written'])}, {r['dissect_time_sec']:.2f}s, {r['dissect_mode']})",
               f"- Metadata: [`layers_metadata.json`]({rel}/layers_metadata.json)",
               f"- Layer browser: [`index.html`]({rel}/index.html) (every output with its picture, statistics "
               "and time; filter by module or type, sort by time or parity error)",
               f"- Status: {r['dissect_status']}", "",
               f"![{r['class_name']} overview]({rel}/overview.png)", ""]
        if r.get("dissect_top_layers"):
            md += [f"The {len(r['dissect_top_layers'])} most expensive layers (own forward time from pre- and "
                   "post-hooks; approximate, hooks add overhead):", ""] + table(
                ["#", "Module", "Type", "Forward (ms)"],
                [[t["index"], t["name"], t["type"], fmt(t["forward_ms"], ".2f")] for t in r["dissect_top_layers"]])
    return "\n".join(md) + "\n"


def load_run(ref: str, history: Path | None) -> dict:
    """--compare's A or B: a report JSON file, or a run id in the history store."""
    path = Path(ref)
    if path.is_file():
        return read_report(path)
    if history is not None and history.is_file():
        store = HistoryStore(history)
        try:
            payload = store.payload(ref)
        finally:
            store.close()
        if payload is not None:
            return payload
    raise UsageError(f"--compare {ref}: neither a report JSON file nor a run id in {history or 'the history'}")


def compare_rows(a: dict, b: dict) -> tuple[list[dict], bool]:
    """Per model in both runs: medians, ratio B/A, two-sided exact Mann-Whitney p and a verdict.
    Across machines only ratios mean something: no p-value and no verdict there."""
    from scipy.stats import mannwhitneyu

    same_machine = a["machine_key"] == b["machine_key"]
    rows_b = {row_key(r): r for r in b["results"] if r["status"] == "ok"}
    rows = []
    for ra in a["results"]:
        rb = rows_b.get(row_key(ra))
        if ra["status"] != "ok" or rb is None:
            continue
        wa, wb = warm_samples(ra), warm_samples(rb)
        ma = float(np.median(wa)) if wa else ra.get("avg_inference_sec")
        mb = float(np.median(wb)) if wb else rb.get("avg_inference_sec")
        ratio = mb / ma if ma else None
        p_value = verdict = None
        if same_machine and len(wa) and len(wb):
            p_value = float(mannwhitneyu(wb, wa, alternative="two-sided", method="exact").pvalue)
            significant = p_value < VERDICT_ALPHA
            verdict = ("slower" if significant and ratio >= WARM_MIN_RATIO else
                       "faster" if significant and ratio <= 1 / WARM_MIN_RATIO else "no change")
            smallest_p = 2 / math.comb(len(wa) + len(wb), len(wa))
            if smallest_p >= VERDICT_ALPHA:  # e.g. 4 vs 4 warm runs: p can never fall under alpha
                verdict = f"too few warm runs ({len(wa)} vs {len(wb)}: p >= {smallest_p:.2g} always)"
        rows.append({"model_name": row_name(ra), "median_a": ma, "median_b": mb, "ratio": ratio,
                     "p_value": p_value, "verdict": verdict, "mem_a": ra.get("mem_peak_mb"),
                     "mem_b": rb.get("mem_peak_mb"), "params_a": ra.get("total_params"),
                     "params_b": rb.get("total_params")})
    return rows, same_machine


def run_label(payload: dict) -> str:
    env = payload["environment"]
    return f"{env.get('hostname') or '?'} / {env.get('gpu_name') or env.get('cpu_model') or '?'} ({payload.get('timestamp')})"


def comparison_text(a: dict, b: dict, rows: list[dict], same_machine: bool) -> list[str]:
    lines = ["# Comparison", "", f"- A: {run_label(a)}, run {a['run_id']}", f"- B: {run_label(b)}, run {b['run_id']}",
             "- Ratio: B's warm median over A's (above 1: B is slower)."]
    if not same_machine:
        lines.append("- A and B ran on different machines: ratios only (no p-value, no verdict).")
    env_changes = environment_changes(b["environment"], a["environment"])
    if env_changes:
        lines.append("- Versions that differ: " + ", ".join(env_changes))
    return lines + [""] + table(
        ["Model", "Warm median A (s)", "Warm median B (s)", "Ratio B/A", "p-value", "Verdict", "Peak MB A",
         "Peak MB B", "Params A", "Params B"],
        [[r["model_name"], fmt(r["median_a"]), fmt(r["median_b"]), fmt(r["ratio"], ".3f"), fmt(r["p_value"], ".2g"),
          r["verdict"] or "n/a", fmt(r["mem_a"], ".0f"), fmt(r["mem_b"], ".0f"), fmt(r["params_a"], ","),
          fmt(r["params_b"], ",")] for r in rows])


def merged_text(payloads: list[dict], labels: list[str], plots: list[str]) -> tuple[str, str]:
    """One report across machines: models x machines, warm medians, memory, speed-up vs the first."""
    models = list(dict.fromkeys(model_backend_name(r) for p in payloads for r in p["results"]))
    cell = {(model_backend_name(r), i): r for i, p in enumerate(payloads) for r in p["results"] if r["status"] == "ok"}
    ended = {(model_backend_name(r), i): r["status"] for i, p in enumerate(payloads) for r in p["results"]
             if r["status"] != "ok"}

    def shown(model: str, i: int, text: str) -> str:  # a model that did not finish there says how it ended
        return text if (model, i) in cell else ended.get((model, i), "n/a")

    def median(model: str, i: int) -> float | None:
        r = cell.get((model, i))
        return r and (r.get("warm_median_sec") or r.get("avg_inference_sec"))

    def speedup(model: str, i: int) -> str:
        first, here = median(model, 0), median(model, i)
        return f"{first / here:.2f}x" if first and here else "n/a"

    md = ["# Merged Benchmark Report", "", "Machines (speed-ups are relative to the first):", ""]
    md += [f"{i + 1}. {label}, run {p['run_id']}" for i, (label, p) in enumerate(zip(labels, payloads))] + [""]
    short = [f"M{i + 1}" for i in range(len(payloads))]
    md += ["## Warm median (s)", ""] + table(["Model", *short], [
        [m, *(shown(m, i, fmt(median(m, i))) for i in range(len(short)))] for m in models])
    md += ["## Speed-up vs M1", ""] + table(["Model", *short], [
        [m, *(shown(m, i, speedup(m, i)) for i in range(len(short)))] for m in models])
    md += ["## Peak memory (MB)", ""] + table(["Model", *short], [
        [m, *(shown(m, i, fmt(cell[(m, i)].get("mem_peak_mb"), ".0f") if (m, i) in cell else "") for i in range(len(short)))]
        for m in models])
    md += [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model_name", "machine", "run_id", "hostname", "gpu", "cpu", "warm_median_sec", "mem_peak_mb",
                     "speedup_vs_first"])
    for m in models:
        for i, p in enumerate(payloads):
            if (m, i) in cell:
                env = p["environment"]
                writer.writerow([m, labels[i], p["run_id"], env.get("hostname"), env.get("gpu_name") or "",
                                 env.get("cpu_model"), median(m, i), cell[(m, i)].get("mem_peak_mb"), speedup(m, i)])
    return "\n".join(md) + "\n", buf.getvalue()


PLOT_DPI = 110
VERDICT_COLOURS = {"suspicious": "tab:orange", "regression": "tab:red", "faster": "tab:green"}


def new_figure(rows: int, width_in: float = 9.0):
    """A matplotlib Figure drawn by the Agg canvas: no display, no pyplot global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, 1.2 + 0.45 * max(rows, 2)), dpi=PLOT_DPI, layout="constrained")


def plain_log_axis(axis) -> None:
    """A log-scale axis labelled 0.1, 0.2, 1, 2 rather than 1e-1 or 2x10^-1."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))


def plot_latency(rows: list[dict], path: Path) -> None:
    """Warm runs per model as points, the cold run marked; log scale (the models differ by 100x)."""
    fig = new_figure(len(rows))
    ax = fig.add_subplot()
    rng = np.random.default_rng(RANDOM_SEED)
    for y, row in enumerate(rows):
        warm = warm_samples(row)
        ax.scatter(warm, y + rng.uniform(-0.15, 0.15, len(warm)), s=14, color="tab:blue", alpha=0.7,
                   label="warm runs" if y == 0 else None)
        ax.scatter([row["cold_inference_sec"]], [y], marker="x", s=60, color="tab:red",
                   label="cold run" if y == 0 else None)
    ax.set_yticks(range(len(rows)), [row_name(r) for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis)
    ax.set_xlabel("forward latency (s, log scale)")
    ax.set_title("Latency per run")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=4, fontsize="small")
    fig.savefig(path)


def plot_phases(rows: list[dict], path: Path) -> None:
    """Preprocess / forward / postprocess as stacked shares of a run, the total beside each bar."""
    fig = new_figure(len(rows))
    ax = fig.add_subplot()
    parts = [("preprocess", "preprocess_avg_sec", "tab:gray"), ("forward", "avg_inference_sec", "tab:blue"),
             ("postprocess", "postprocess_avg_sec", "tab:orange")]
    totals = [sum(r[key] or 0.0 for _, key, _ in parts) for r in rows]
    left = np.zeros(len(rows))
    for label, key, colour in parts:
        share = np.array([100 * (r[key] or 0.0) / t if t else 0.0 for r, t in zip(rows, totals)])
        ax.barh(range(len(rows)), share, left=left, color=colour, label=label)
        left += share
    for y, total in enumerate(totals):
        ax.text(101, y, f"{total * 1000:.0f} ms", va="center", fontsize="small")
    ax.set_yticks(range(len(rows)), [row_name(r) for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 118)
    ax.set_xlabel("share of one run (%); total per run beside each bar")
    ax.set_title("Preprocess / forward / postprocess")
    fig.legend(loc="outside lower center", ncols=4, fontsize="small")
    fig.savefig(path)


def plot_memory(rows: list[dict], path: Path) -> None:
    fig = new_figure(len(rows))
    ax = fig.add_subplot()
    ys = range(len(rows))
    ax.barh(ys, [r["mem_peak_mb"] or 0 for r in rows], color="tab:purple", label="peak")
    ax.barh(ys, [r["mem_before_mb"] or 0 for r in rows], color="tab:gray", alpha=0.6, label="baseline")
    ax.set_yticks(ys, [row_name(r) for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"memory (MB, {rows[0]['mem_kind']})")
    ax.set_title("Memory peaks")
    fig.legend(loc="outside lower center", ncols=4, fontsize="small")
    fig.savefig(path)


def plot_trend(model_name: str, points: list[dict], path: Path) -> None:
    """Warm median per run over time, the verdict's threshold band, flagged runs coloured."""
    fig = new_figure(4)
    ax = fig.add_subplot()
    xs = range(len(points))
    ax.plot(xs, [p["warm_median_sec"] for p in points], marker="o", color="tab:blue", label="warm median")
    band = [(x, p["baseline"], p["threshold"]) for x, p in zip(xs, points) if p.get("baseline") and p.get("threshold")]
    if band:
        bx, base, thr = (np.array(v, dtype=float) for v in zip(*band))
        ax.fill_between(bx, base / thr, base * thr, color="tab:green", alpha=0.15, label="no-change band")
    for verdict, colour in VERDICT_COLOURS.items():
        hit = [(x, p["warm_median_sec"]) for x, p in zip(xs, points) if p.get("verdict") == verdict]
        if hit:
            ax.scatter(*zip(*hit), s=80, color=colour, zorder=3, label=verdict)
    ax.set_xticks(list(xs), [p["started_at"][:16].replace("T", "\n") for p in points], fontsize="x-small")
    ax.set_ylabel("warm median (s)")
    ax.set_title(f"{model_name}: warm latency across runs")
    fig.legend(loc="outside lower center", ncols=4, fontsize="small")
    fig.savefig(path)


def write_plots(rows: list[dict], plots_dir: Path, trends: dict[str, list[dict]]) -> list[Path]:
    """The run's charts as PNG files; a plotting failure is a warning, never a lost report."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    written = []
    try:
        plots_dir.mkdir(parents=True, exist_ok=True)
        for name, draw in (("latency", plot_latency), ("phases", plot_phases), ("memory", plot_memory)):
            draw(ok, plots_dir / f"{name}.png")
            written.append(plots_dir / f"{name}.png")
        for row in ok:
            points = trends.get(row_key(row), [])
            if len(points) >= 2:
                path = plots_dir / f"trend_{sanitize_layer_name(row_key(row))}.png"
                plot_trend(row_name(row), points, path)
                written.append(path)
    except Exception as e:
        log(f"Plots were not all written ({type(e).__name__}: {e}); the reports are complete without them", "WARNING")
    return written


def plot_merged(payloads: list[dict], labels: list[str], path: Path) -> bool:
    """Warm medians of every model on every machine as grouped bars (log scale)."""
    try:
        models = list(dict.fromkeys(model_backend_name(r) for p in payloads for r in p["results"] if r["status"] == "ok"))
        fig = new_figure(len(models) * len(payloads) // 2 + 2)
        ax = fig.add_subplot()
        height = 0.8 / len(payloads)
        for i, (payload, label) in enumerate(zip(payloads, labels)):
            by_model = {model_backend_name(r): r for r in payload["results"] if r["status"] == "ok"}
            values = [(by_model[m].get("warm_median_sec") or by_model[m]["avg_inference_sec"]) if m in by_model else 0
                      for m in models]
            ax.barh(np.arange(len(models)) + i * height, values, height=height, label=f"M{i + 1}: {label}")
        ax.set_yticks(np.arange(len(models)) + 0.4 - height / 2, models)
        ax.invert_yaxis()
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
        ax.set_xlabel("warm median (s, log scale)")
        ax.set_title("Warm latency per machine")
        fig.legend(loc="outside lower center", ncols=4, fontsize="small")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return True
    except Exception as e:
        log(f"The merged plot was not written ({type(e).__name__}: {e})", "WARNING")
        return False


def write_merged_report(payloads: list[dict], labels: list[str], results_dir: Path, stamp: str) -> list[Path]:
    """The cross-machine report (Markdown, CSV, chart) of --merge and of --fleet every-node."""
    plot = Path(f"plots_{stamp}") / "merged_latency.png"
    plots = [plot.as_posix()] if plot_merged(payloads, labels, results_dir / plot) else []
    md, table_csv = merged_text(payloads, labels, plots)
    paths = [results_dir / f"merged_report_{stamp}.md", results_dir / f"merged_summary_{stamp}.csv"]
    for path, text in zip(paths, (md, table_csv)):
        atomic_write_text(path, text)
    return paths


def generate_reports(payload: dict, cfg: RunConfig, trends: dict[str, list[dict]]) -> list[Path]:
    """The plots, then the JSON, CSV and Markdown reports (each written atomically)."""
    plots_dir = cfg.results_dir / f"plots_{cfg.timestamp}"
    plots = write_plots(payload["results"], plots_dir, trends)
    payload["plots"] = [p.relative_to(cfg.results_dir).as_posix() for p in plots]
    paths = [cfg.results_dir / f"benchmark_results_{cfg.timestamp}.json",
             cfg.results_dir / f"benchmark_summary_{cfg.timestamp}.csv",
             cfg.results_dir / f"benchmark_report_{cfg.timestamp}.md"]
    texts = [json.dumps(payload, indent=2, default=str, ensure_ascii=False), csv_text(payload["results"]),
             markdown_text(payload, cfg)]
    try:
        for path, text in reversed(list(zip(paths, texts))):  # the JSON last: there, the run's reports are all there
            atomic_write_text(path, text)
    except OutputError:
        for path in paths:
            path.unlink(missing_ok=True)  # all three reports or none
        shutil.rmtree(plots_dir, ignore_errors=True)
        raise
    return paths


def verdict_figure(verdict: dict, key: str) -> str:
    value = verdict.get(key)
    if value is None:
        return "n/a"
    if verdict["metric"] == "accuracy":
        return f"relative error {value:.2e}"
    return f"{value:.0f} MB" if verdict["metric"].startswith("memory peak") else f"{value:.4f} s"


def verdict_rows(verdicts: list[dict]) -> list[list[str]]:
    return [[v["model_name"], v["metric"], verdict_figure(v, "baseline"), verdict_figure(v, "now"),
             fmt(v.get("ratio"), ".3f"), fmt(v.get("p_value"), ".2g"),
             v["verdict"] + (f" ({v['detail']})" if v.get("detail") else ""),
             "; ".join(v["notes"] + ([("versions: " + ", ".join(v["env_changes"]))] if v["env_changes"] else [])) or "-"]
            for v in verdicts]


VERDICT_HEADER = ["Model", "Metric", "Baseline", "Now", "Ratio", "p-value", "Verdict", "Notes"]


def changes_markdown(payload: dict) -> list[str]:
    md = ["## Changes since earlier runs", ""]
    verdicts = payload.get("verdicts")
    if verdicts is None:
        return md + [payload.get("history_note") or "No run history (--no-history).", ""]
    return md + [
        f"Against earlier runs on this machine with the same configuration (history: `{payload['history']}`). "
        f"Warm latency: exact one-sided Mann-Whitney U at alpha {VERDICT_ALPHA} against the pooled warm runs of "
        f"the last {BASELINE_MIN_RUNS}-{BASELINE_MAX_RUNS} runs AND a median ratio of at least "
        f"max({WARM_MIN_RATIO}, 1 + 4 x robust CV of their medians); cold start: ratio to the median of the last "
        f"cold starts of at least max({COLD_MIN_RATIO}, 1 + 4 x MAD/median); memory: over {MEMORY_MIN_REL:.0%} "
        f"and {MEMORY_MIN_MB:.0f} MiB above the median. A first occurrence is suspicious, the same in the next "
        f"run a regression. Slow drifts ('<metric> trend'): over this run and up to {DRIFT_WINDOW_RUNS - 1} before "
        f"it (at least {DRIFT_MIN_RUNS}, from the latest regression on), a one-sided Mann-Kendall test at alpha "
        f"{DRIFT_ALPHA} AND the newest {DRIFT_EDGE_RUNS} runs' median over the oldest {DRIFT_EDGE_RUNS}' at least "
        + ", ".join(f"{floor:.0%} ({metric})" for metric, floor in DRIFT_FLOORS.items()) + f". Every run at a glance: "
        f"[the trend site]({SITE_FILE_NAME}).", ""] + table(VERDICT_HEADER, verdict_rows(verdicts)) + history_size_text(payload)


def history_size_text(payload: dict) -> list[str]:
    """The history's size before this run, and what --history-keep-runs keeps."""
    size = payload.get("history_size")
    if not size or not size.get("history_runs"):
        return ["", "The history was empty before this run."]
    keep = payload.get("history_keep_runs")
    return ["", f"The history held {size['history_runs']} run(s) in {size['history_mb']:.2f} MB before this run; "
            + (f"it keeps the newest {keep} (--history-keep-runs)." if keep else "every run is kept (no --history-keep-runs).")]


def print_changes(payload: dict) -> None:
    """The verdicts on the console, one line each, plain ASCII."""
    verdicts = payload.get("verdicts")
    if not verdicts:
        return
    banner("CHANGES SINCE EARLIER RUNS")
    for row in verdict_rows(verdicts):
        level = "WARNING" if any(word in row[6] for word in (*FLAGGED, "drifting", "parity changed")) else "VERDICT"
        log(f"{row[0]} {row[1]}: {row[6]} (baseline {row[2]}, now {row[3]}, ratio {row[4]}, p {row[5]}) {row[7]}",
            level)


def print_summary(outcome: RunOutcome, cfg: RunConfig, total_time_sec: float, paths: list[Path]) -> None:
    done = [r for r in outcome.results if r["status"] == "ok"]
    banner("BENCHMARK COMPLETE" if outcome.complete and outcome.exit_code == EXIT_OK else "BENCHMARK INCOMPLETE")
    log(f"Models Benchmarked: {len(done)}", "")
    if len(cfg.backends) > 1:
        log(f"Backends: {', '.join(cfg.backends)} (each model once per backend; the counts here are rows)", "")
    for r in outcome.results:
        if r["status"] != "ok":
            log(f"  {row_key(r)}: {r['status']}", "")
    log(f"Test Images: {len(cfg.images)}", "")
    log(f"Inference Runs per Image: {cfg.runs}", "")
    log(f"Total Inference Runs: {len(cfg.images) * cfg.runs * len(done)}", "")
    log(f"Total Execution Time: {total_time_sec:.2f}s", "")
    log("", "")
    log("Output Files:", "")
    for path in paths:
        log(f"  - {path}", "")
    if cfg.dissect and done:
        log("", "")
        log("Visualizations:", "")
        log(f"  - {cfg.viz_dir}/", "")
    log("=" * 80, "")


# --------------------------------------------------------------------------------------
# Trend site: results/index.html, every run of the history at a glance
# --------------------------------------------------------------------------------------

SITE_METRICS = (  # (key in a point, verdict metric, label, unit); energy and parity only where recorded
    ("warm", "warm latency", "warm median", "s"), ("cold", "cold start", "cold start", "s"),
    ("mem", "memory peak", "peak memory", "MB"), ("energy", None, "energy per inference", "J"),
    ("parity", "accuracy", "parity: worst relative error", ""))
SITE_CHANGE_RUNS = (7, 30)  # the table's changes: the latest figure against the run 7 and 30 runs before

TREND_SITE_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vision-bench: every run</title>
<style>
body { font: 13px sans-serif; margin: 1em; } h2 { margin-top: 1.5em; } .hidden { display: none; }
table { border-collapse: collapse; } td, th { border-bottom: 1px solid #eee; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.chart-card { display: inline-block; vertical-align: top; margin: .5em 1em .5em 0; }
.pt { cursor: pointer; } .regression, .drifting { fill: #d62728; } .suspicious { fill: #ff7f0e; }
.faster, .lower { fill: #2ca02c; } .normal { fill: #1f77b4; } .incomplete { fill: #fff; stroke: #1f77b4; }
#detail { position: fixed; right: 1em; top: 1em; width: 26em; background: #fff; border: 1px solid #999;
  padding: .5em; white-space: pre-wrap; }
</style></head>
<body>
<h1>vision-bench: every run of __HISTORY__</h1>
<p>Written __GENERATED__ from the history alone. Points: one run each; red a regression or a drift, orange
suspicious, green faster or lower, hollow an incomplete run (never a baseline); the grey band is the no-change
band of that run's verdict. Hover a point for its figures, click it for the run's versions and links.</p>
<p>Model: <select id="model-filter"><option value="">all</option></select>
 Machine: <select id="machine-filter"><option value="">all</option></select>
 <span id="count"></span></p>
<table id="latest"><thead><tr><th>Machine</th><th>Configuration</th><th>Model</th><th>Latest warm median</th>
<th>Change over 7 runs</th><th>Change over 30 runs</th><th>Latest verdict</th><th>Runs</th></tr></thead><tbody></tbody></table>
<div id="groups"></div>
<div id="detail" class="hidden"></div>
<script>
"use strict";
const DATA = __DATA__;
const errors = [];
window.addEventListener("error", e => { errors.push(String(e.message)); document.body.dataset.jsErrors = errors.join("; "); });
const NS = "http://www.w3.org/2000/svg";
const fmt = (v, unit) => v === null || v === undefined ? "n/a" :
  (unit === "s" ? v.toFixed(4) + " s" : unit === "MB" ? v.toFixed(0) + " MB" : unit === "J" ? v.toFixed(3) + " J" : v.toExponential(2));
const pct = v => v === null ? "n/a" : (v >= 0 ? "+" : "") + (100 * v).toFixed(1) + "%";
function svg(tag, attrs, parent) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}
function panel(root, model, metric, top) {
  const [key, verdictMetric, label, unit] = metric, W = 420, H = 110, L = 60;
  const pts = model.points.map((p, i) => [i, p[key], p]).filter(q => q[1] !== null && q[1] !== undefined);
  if (!pts.length) return 0;
  const bands = pts.map(q => (q[2].bands || {})[verdictMetric]).filter(b => b);
  const all = pts.map(q => q[1]).concat(...bands);
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi === lo) { hi += Math.abs(hi) * 0.05 || 1; lo -= Math.abs(lo) * 0.05 || 1; }
  const n = Math.max(model.points.length - 1, 1);
  const x = i => L + (W - L - 10) * i / n, y = v => top + 18 + (H - 30) * (1 - (v - lo) / (hi - lo));
  svg("text", {x: 4, y: top + 12, "font-size": 11}, root).textContent = label + (unit ? " (" + unit + ")" : "");
  svg("text", {x: 4, y: top + 30, "font-size": 9}, root).textContent = fmt(hi, unit);
  svg("text", {x: 4, y: top + H - 12, "font-size": 9}, root).textContent = fmt(lo, unit);
  for (const [i, , p] of pts) {
    const band = (p.bands || {})[verdictMetric];
    if (band) svg("rect", {x: x(i) - (W - L) / n / 2, width: (W - L) / n, y: y(band[1]), height: Math.max(1, y(band[0]) - y(band[1])),
                           fill: "#ddd", "fill-opacity": 0.6}, root);
  }
  svg("polyline", {points: pts.map(q => x(q[0]) + "," + y(q[1])).join(" "), fill: "none", stroke: "#1f77b4"}, root);
  for (const [i, v, p] of pts) {
    const verdict = (p.marks || {})[verdictMetric] || "";
    const cls = !p.complete ? "incomplete" : ["regression", "drifting", "suspicious", "faster", "lower"].includes(verdict) ? verdict : "normal";
    const dot = svg("circle", {cx: x(i), cy: y(v), r: 4, class: "pt " + cls, "data-run": p.run_id, "data-metric": key}, root);
    svg("title", {}, dot).textContent = p.started_at + "  run " + p.run_id + "\\n" + label + ": " + fmt(v, unit) +
      (verdict ? "  (" + verdict + ")" : "");
    dot.addEventListener("click", () => show(model, p));
  }
  return pts.length;
}
function show(model, p) {
  const box = document.getElementById("detail");
  box.classList.remove("hidden");
  box.textContent = model.model_name + "\\nrun " + p.run_id + "\\n" + p.started_at + (p.complete ? "" : " (incomplete)") +
    "\\n\\n" + DATA.metrics.filter(m => p[m[0]] !== null && p[m[0]] !== undefined).map(m => m[2] + " " + fmt(p[m[0]], m[3])).join(", ") +
    "\\nverdicts: " + (Object.entries(p.verdicts || {}).map(e => e.join(": ")).join(", ") || "none") +
    "\\nversions changed: " + (p.env_changes.join(", ") || "none") + "\\n";
  for (const [text, href] of [["Markdown report", p.report], ["layer browser", p.browser]]) {
    if (!href) continue;
    const a = document.createElement("a"); a.href = href; a.textContent = text; box.appendChild(a); box.append("  ");
  }
}
function build() {
  const groups = document.getElementById("groups"), tbody = document.querySelector("#latest tbody");
  const models = new Map(), machines = new Map();
  for (const g of DATA.groups) {
    machines.set(g.machine_key, g.machine);
    const sec = document.createElement("section");
    sec.className = "group"; sec.dataset.machine = g.machine_key;
    sec.innerHTML = "<h2></h2><p></p>";
    sec.querySelector("h2").textContent = g.machine; sec.querySelector("p").textContent = g.config_label;
    for (const m of g.models) {
      models.set(m.class_name, m.model_name);
      const card = document.createElement("div");
      card.className = "chart-card"; card.dataset.model = m.class_name; card.dataset.machine = g.machine_key;
      card.innerHTML = "<b></b><br>"; card.querySelector("b").textContent = m.model_name;
      const root = svg("svg", {class: "chart", width: 430}, card);
      let top = 0;
      for (const metric of DATA.metrics) if (panel(root, m, metric, top)) top += 110;
      root.setAttribute("height", top); card.dataset.points = String(m.points.length);
      sec.appendChild(card);
      const row = tbody.insertRow();
      row.dataset.model = m.class_name; row.dataset.machine = g.machine_key;
      const t = m.latest;
      for (const [text, num] of [[g.machine, false], [g.config_label, false], [m.model_name, false], [fmt(t.warm, "s"), true],
                                  [pct(t.change_7), true], [pct(t.change_30), true], [t.verdict || "n/a", false], [String(m.points.length), true]]) {
        const cell = row.insertCell(); cell.textContent = text; if (num) cell.className = "num";
      }
    }
    groups.appendChild(sec);
  }
  for (const [id, map] of [["model-filter", models], ["machine-filter", machines]]) {
    const sel = document.getElementById(id);
    for (const [value, text] of map) { const o = document.createElement("option"); o.value = value; o.textContent = text; sel.appendChild(o); }
    sel.addEventListener("change", apply);
  }
}
function apply() {
  const model = document.getElementById("model-filter").value, machine = document.getElementById("machine-filter").value;
  const keep = el => (!model || el.dataset.model === model) && (!machine || el.dataset.machine === machine);
  let charts = 0, points = 0;
  for (const el of document.querySelectorAll(".chart-card, #latest tbody tr")) el.classList.toggle("hidden", !keep(el));
  for (const card of document.querySelectorAll(".chart-card:not(.hidden)")) { charts++; points += Number(card.dataset.points); }
  for (const sec of document.querySelectorAll("section.group"))
    sec.classList.toggle("hidden", !sec.querySelector(".chart-card:not(.hidden)"));
  document.body.dataset.charts = String(document.querySelectorAll(".chart-card").length);
  document.body.dataset.chartsShown = String(charts);
  document.body.dataset.pointsShown = String(points);
  document.getElementById("count").textContent = charts + " chart(s), " + points + " run(s) shown";
}
build();
const wanted = new URLSearchParams(location.hash.slice(1));
if (wanted.has("model")) document.getElementById("model-filter").value = wanted.get("model");
if (wanted.has("machine")) document.getElementById("machine-filter").value = wanted.get("machine");
apply();
</script>
</body></html>
"""


def site_points(store: HistoryStore, site_dir: Path) -> dict[tuple[str, str, str], list[dict]]:
    """Every ok result of the history as a chart point, oldest first, keyed (machine, config, class)."""
    verdicts: dict[tuple[str, str, str], dict] = {}
    for v in store.db.execute("SELECT run_id, class_name, backend, machine_key, metric, verdict, baseline, threshold "
                              "FROM verdicts"):
        verdicts.setdefault((v["run_id"], v["class_name"], v["backend"], v["machine_key"]), {})[v["metric"]] = dict(v)
    series: dict[tuple[str, str, str], list[dict]] = {}
    found = store.db.execute(
        "SELECT m.*, r.started_at, r.timestamp, r.environment, r.complete, r.hostname FROM model_results m "
        "JOIN runs r USING (run_id) WHERE m.status='ok' ORDER BY r.started_at")
    for rec in found:
        row = json.loads(rec["row"])
        judged = verdicts.get((rec["run_id"], rec["class_name"], rec["backend"], rec["machine_key"]), {})
        key = (rec["machine_key"], rec["config_key"], rec["class_name"])
        earlier = series.setdefault(key, [])
        node = row.get("node") or {}  # a Ray row ran on its node, not on the machine that started the run
        env, host = node.get("environment") or json.loads(rec["environment"]), node.get("hostname") or rec["hostname"]
        series[key].append({
            "run_id": rec["run_id"], "started_at": rec["started_at"], "complete": bool(rec["complete"]),
            "model_name": rec["model_name"], "config": json.loads(rec["config"]), "env": env,
            "machine": f"{host or 'unknown host'} ({env.get('gpu_name') or env.get('cpu_model') or 'cpu'})",
            "warm": rec["warm_median_sec"], "cold": rec["cold_inference_sec"], "mem": rec["mem_peak_mb"],
            "energy": row.get("energy_j_per_inference"), "parity": row.get("parity_rel_l2_max"),
            "verdicts": {m: v["verdict"] for m, v in judged.items()},
            "marks": {m: shown_verdict(judged, m) for _, m, _, _ in SITE_METRICS if m},
            "bands": {m: no_change_band(m, v["baseline"], v["threshold"]) for m, v in judged.items()
                      if v["baseline"] and v["threshold"]},
            "env_changes": environment_changes(env, earlier[-1]["env"]) if earlier else [],
            "report": site_link(site_dir, site_dir / f"benchmark_report_{rec['timestamp']}.md"),
            "browser": site_link(site_dir, Path(row["viz_dir"]) / "index.html") if row.get("viz_dir") else None})
    return series


def no_change_band(metric: str, baseline: float, threshold: float) -> list[float]:
    """The figures a verdict calls 'no change': within the ratio threshold either way, and for
    memory within max(5%, 64 MiB) of the baseline (memory_verdict's two floors)."""
    if metric == "memory peak":
        width_mb = max(MEMORY_MIN_REL * baseline, MEMORY_MIN_MB)
        return [baseline - width_mb, baseline + width_mb]
    return [baseline / threshold, baseline * threshold]


def shown_verdict(judged: dict, metric: str) -> str | None:
    """The one verdict a point shows for a metric: a night-over-night flag, else a drift (stored
    beside the night-over-night verdict, which is always there), else that verdict."""
    now = (judged.get(metric) or {}).get("verdict")
    drift = (judged.get(f"{metric} trend") or {}).get("verdict")
    return now if now in FLAGGED or drift != "drifting" else drift


def site_link(site_dir: Path, target: Path) -> str | None:
    """A link from the site to a file, relative, or None when the file is not there."""
    return Path(os.path.relpath(target, site_dir)).as_posix() if target.is_file() else None


def latest_figures(points: list[dict]) -> dict:
    """The table's row: the latest warm median, its change over 7 and 30 runs, its latest verdict."""
    warm = [p["warm"] for p in points]

    def change(runs: int) -> float | None:
        if len(warm) <= runs or not warm[-1 - runs] or warm[-1] is None:
            return None
        return warm[-1] / warm[-1 - runs] - 1

    return {"warm": warm[-1], "change_7": change(SITE_CHANGE_RUNS[0]), "change_30": change(SITE_CHANGE_RUNS[1]),
            "verdict": points[-1]["marks"].get("warm latency")}


def config_label(config: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in (config.get("options") or {}).items()) or "default options"
    images = config.get("images") or []
    return (f"{config.get('weights')} weights, {config.get('device_type')}, {config.get('runs_per_image')} runs per "
            f"image on {len(images)} image(s), isolation {config.get('isolation')}, {options}")


def site_data(store: HistoryStore, site_dir: Path) -> dict:
    """The page's data: one group per (machine, configuration), a model with its points in each."""
    groups: dict[tuple[str, str], dict] = {}
    for (machine, config_key, class_name), points in site_points(store, site_dir).items():
        for p in points:
            p.pop("env")
        group = groups.setdefault((machine, config_key), {
            "machine_key": machine, "machine": points[-1]["machine"], "config_label": config_label(points[-1]["config"]),
            "models": []})
        group["models"].append({"class_name": class_name, "model_name": points[-1]["model_name"],
                                "points": [{k: v for k, v in p.items() if k not in ("config", "machine", "model_name")}
                                           for p in points], "latest": latest_figures(points)})
    return {"groups": list(groups.values()), "metrics": [list(m) for m in SITE_METRICS]}


def write_trend_site(history: Path, site_dir: Path) -> Path:
    """results/index.html from the history alone: static, one file, no network (JSON inside)."""
    store = HistoryStore(history)
    try:
        data = site_data(store, site_dir)
    finally:
        store.close()
    fields = {"__HISTORY__": html.escape(str(history)), "__GENERATED__": datetime.now().isoformat(timespec="seconds"),
              "__DATA__": json.dumps(json_safe(data)).replace("<", "\\u003c")}  # no "</script>" from the data
    # one pass: a placeholder's text inside the data (a path, a model name) is never replaced again
    page = re.sub("|".join(fields), lambda m: fields[m.group(0)], TREND_SITE_HTML)
    path = site_dir / SITE_FILE_NAME
    atomic_write_text(path, page)
    return path


# --------------------------------------------------------------------------------------
# Executors: the suite here (local) or on a Ray cluster
# --------------------------------------------------------------------------------------

EXECUTORS = ("local", "ray")
FLEET_MODES = ("spread", "every-node", "every-gpu-type")
RAY_SLOT = "vision_bench_slot"   # custom resource, 1 per node: a node never runs two models at once
RAY_FILE_MODES = ("auto", "shared", "object-store")
RAY_CHUNK_BYTES = 8 * 1024**2    # dissection files travel through the object store in chunks this size
RAY_POLL_SEC = 0.5
RAY_NICENESS_ENV = "RAY_worker_niceness"  # Ray's niceness of its worker processes (15 unless set)
RAY_CONNECT_TIMEOUT_SEC = 5.0    # a cluster address that takes no TCP connection within this: exit 2
RAY_CANCEL_WAIT_SEC = 10.0       # cancelled tasks are given this long to end before their folders go
RAY_CLEANUP_TIMEOUT_SEC = 20.0   # the per-node removal of a run's temporary folders
RAY_LITTER_MIN_AGE_SEC = 3600.0  # an earlier run's folder (its owner process dead) goes when older than this
RAY_TEMP_NAME = re.compile(r"vision-bench-(task|viz)-([0-9a-f]{8})-(\d+)-")  # kind, run tag, owner pid
RAY_TOKEN_FILE = Path(".ray") / "auth_token"  # Ray's default token file, under the home folder
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node (spread places a model among some nodes)
HEAD_RESOURCE = "node:__internal_head__"


@dataclass
class RayOptions:
    address: str = "auto"
    fleet: str = "spread"
    files: str = "auto"


# -- decisions (pure: they test without Ray) -------------------------------------------


def ray_task_resources(use_gpu: bool) -> dict:
    """What one model's task asks of Ray: the node's one benchmark slot in every fleet mode (the
    spec's one model at a time per node: no shared CPU, PCIe or power budget), and a GPU for CUDA runs."""
    return {"num_cpus": 0, "resources": {RAY_SLOT: 1}, **({"num_gpus": 1} if use_gpu else {})}


def node_where(node: dict) -> str:
    """A node as messages name it: its id's start and its host."""
    return f"node {node['NodeID'][:12]} ({node.get('NodeManagerHostname', '?')})"


def eligible_nodes(nodes: list[dict], use_gpu: bool) -> tuple[list[dict], list[str]]:
    """The alive nodes that can take a model (a benchmark slot, and a GPU for CUDA runs), and why
    each other alive node is left out."""
    usable, excluded = [], []
    for node in (n for n in nodes if n["Alive"]):
        res, where = node["Resources"], node_where(node)
        if res.get(RAY_SLOT, 0) < 1:
            excluded.append(f"{where}: no '{RAY_SLOT}' resource (start it with --resources '{{\"{RAY_SLOT}\": 1}}')")
        elif use_gpu and res.get("GPU", 0) < 1:
            excluded.append(f"{where}: no GPU, and this run uses CUDA (--device cpu runs on every node; --device "
                            f"auto with --fleet every-node runs each node on what it has)")
        else:
            usable.append(node)
    return usable, excluded


@dataclass
class FleetNode:
    """A node this run uses: how its tasks run there, and what its preflight found."""

    node: dict                   # its ray.nodes() entry
    device: str                  # --device of its tasks: cpu, or auto/cuda (the GPU Ray gives the task)
    gpu: bool                    # its tasks ask Ray for a GPU
    ordinal: int | None = None   # its number among the alive nodes on its host, when there are several
    facts: dict = field(default_factory=dict)            # node_facts() from its preflight
    skips: dict[str, str] = field(default_factory=dict)  # class name -> why that model is skipped here

    @property
    def node_id(self) -> str:
        return self.node["NodeID"]

    @property
    def where(self) -> str:
        return node_where(self.node)

    @property
    def label(self) -> str:
        """How the reports name the node (a column of the merged report): the same for all its rows."""
        host = self.facts.get("hostname") or self.node.get("NodeManagerHostname", "?")
        return f"{host} {self.node_id[:8]} {self.facts.get('gpu_name') or 'CPU'}"


def fleet_nodes(nodes: list[dict], request: str, fleet: str) -> tuple[list[FleetNode], list[str]]:
    """The nodes this run uses and their device, and why each other alive node is left out.

    --device cpu: every node on its CPU; cuda: the GPU nodes. auto: with every-node and
    every-gpu-type (tasks pinned to nodes) each node on what it has, a GPU or else its CPU; with
    spread the GPU nodes when the cluster has any (a spread task asks for a GPU or not before Ray
    places it, so CPU nodes are left out, saying so), else every node on its CPU."""
    if request != "auto":
        gpu = request.startswith("cuda")
        usable, excluded = eligible_nodes(nodes, gpu)
        return [FleetNode(n, request, gpu) for n in usable], excluded
    usable, excluded = eligible_nodes(nodes, use_gpu=False)
    has_gpu = [n["Resources"].get("GPU", 0) >= 1 for n in usable]
    if fleet == "spread" and any(has_gpu):
        excluded += [f"{node_where(n)}: no GPU, and spread with --device auto runs on the GPU nodes (--fleet "
                     f"every-node runs each node on what it has; --device cpu runs every node on its CPU)"
                     for n, gpu in zip(usable, has_gpu) if not gpu]
        usable = [n for n, gpu in zip(usable, has_gpu) if gpu]
        has_gpu = [True] * len(usable)
    return [FleetNode(n, "auto" if gpu else "cpu", gpu) for n, gpu in zip(usable, has_gpu)], excluded


def node_ordinals(nodes: list[dict]) -> dict[str, int]:
    """Each alive node's number among the alive nodes on its host, for hosts running several.

    Node IDs and ports change with every `ray start`; what a node is started with does not. So
    the order is: the head first, then by --node-name, then by resources (CPUs, GPUs, GPU type,
    custom), and only then by port (nodes alike in all of that are alike in what they measure):
    the same setup started the same way gets the same numbers every night."""
    by_host: dict[str, list[dict]] = {}
    for node in (n for n in nodes if n["Alive"]):
        by_host.setdefault(node.get("NodeManagerHostname") or node.get("NodeManagerAddress", "?"), []).append(node)

    def order(node: dict) -> tuple:
        res = node["Resources"]
        fixed = sorted((k, v) for k, v in res.items() if not k.startswith("node:") and "memory" not in k)
        return HEAD_RESOURCE not in res, node.get("NodeName", ""), fixed, node.get("NodeManagerPort", 0)

    ordinals: dict[str, int] = {}
    for group in (g for g in by_host.values() if len(g) > 1):
        ordinals.update({n["NodeID"]: i for i, n in enumerate(sorted(group, key=order), 1)})
    return ordinals


def node_key(row: dict, node: FleetNode) -> str:
    """A row's machine key in the history: its node's, numbered when its host runs several nodes
    (they share a machine key: host, CPU, GPU; one run would store two rows under one key)."""
    base = (row.get("node") or {}).get("machine_key") or node.facts.get("machine_key") or "unknown"
    return base if node.ordinal is None else f"{base}#{node.ordinal}"


@dataclass
class Placement:
    """One model on the cluster: a task (pinned to a node, or placed by Ray), or a skipped row."""

    cls: type[ModelBenchmark]
    device: str                              # --device of its task
    gpu: bool                                # its task asks Ray for a GPU
    node: FleetNode | None = None            # pinned (every-node, every-gpu-type)
    allowed: list[FleetNode] | None = None   # spread: the nodes that have the model (None: any)
    skip: str | None = None                  # why it is a skipped row instead of a task
    backend: str = "torch"                   # --backend: each model's task once per backend

    @property
    def name(self) -> str:
        return run_key(self.cls.__name__, self.backend)


def gpu_type(node: dict) -> str:
    """A node's kind for --fleet every-gpu-type: Ray's accelerator_type, or CPU."""
    kind = next((k for k in node["Resources"] if k.startswith("accelerator_type:")), None)
    return kind.split(":", 1)[1] if kind else "CPU"


def fleet_plan(models: list[type[ModelBenchmark]], nodes: list[FleetNode], fleet: str,
               backends: list[str] = ("torch",)) -> list[Placement]:
    """What runs where, each placement once per backend (in --backend's order). spread: each model
    once, on any node that has it (skipped when none has);
    every-node: every model on every node; every-gpu-type: on one node per GPU type, the one
    lacking the fewest models. A model is skipped only where it cannot run, naming the node."""
    if fleet == "spread":
        plan = []
        for cls in models:
            have = [n for n in nodes if cls.__name__ not in n.skips]
            reason = "; ".join(f"{n.where}: {n.skips[cls.__name__]}" for n in nodes) if not have else None
            plan.append(Placement(cls, nodes[0].device, nodes[0].gpu, skip=reason,
                                  allowed=have if 0 < len(have) < len(nodes) else None))
        return [replace(p, backend=b) for p in plan for b in backends]
    if fleet == "every-gpu-type":
        by_type: dict[str, list[FleetNode]] = {}
        for node in nodes:
            by_type.setdefault(gpu_type(node.node), []).append(node)
        nodes = [min(group, key=lambda n: len(n.skips)) for group in by_type.values()]
    return [Placement(cls, n.device, n.gpu, node=n, backend=b,
                      skip=f"{n.where}: {n.skips[cls.__name__]}" if cls.__name__ in n.skips else None)
            for n in nodes for cls in models for b in backends]


def node_selector(nodes: list[FleetNode]) -> dict[str, str]:
    """Ray's label selector for "any of these nodes"."""
    return {NODE_ID_LABEL: "in(" + ", ".join(n.node_id for n in nodes) + ")"}


def placed_row(row: dict, node: FleetNode) -> dict:
    """A row with the node it ran on (or was meant for): id, facts, label and history key."""
    row = {**row, "node_id": node.node_id, "node": row.get("node") or node.facts, "node_label": node.label}
    return {**row, "node_key": node_key(row, node)}


def planned_device(placement: Placement) -> str:
    """The device type a placement's task asks for (a row that never ran records it)."""
    return "cuda" if placement.gpu else "cpu"


def skipped_row(placement: Placement) -> dict:
    """A model no node of its placement can run (the spec's DA-V2 skip), naming where."""
    row = status_row(placement.cls, "skipped", placement.skip, backend=placement.backend,
                     device=planned_device(placement))
    return placed_row(row, placement.node) if placement.node else row


def dead_task_row(placement: Placement, node: FleetNode | None, error: BaseException) -> dict:
    """The row of a task that died (its worker or node lost, or cancelled): crashed, naming its node."""
    cls = placement.cls
    text = ANSI_ESCAPE.sub("", str(error)).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    where = node.where if node else "no node yet (it died before it started)"
    row = status_row(cls, "crashed", f"{cls.__name__}: the Ray task on {where} died: {type(error).__name__}: {first}",
                     backend=placement.backend, device=planned_device(placement))
    return placed_row(row, node) if node else row


def ray_temp_litter(entries: list[tuple[str, float]], run_tag: str, pid_alive: Callable[[int], bool],
                    now: float) -> list[str]:
    """Which of a node's temporary folders (name, mtime) to remove at the end of a run: this run's,
    and an earlier run's whose owner process is gone and that nothing wrote in for
    RAY_LITTER_MIN_AGE_SEC (mtime: the newest of its tree; its driver died too: nobody else will;
    a pid from another pid namespace can look dead, its live run still writes). Other names are never touched."""
    doomed = []
    for name, mtime in entries:
        match = RAY_TEMP_NAME.match(name)
        if match and (match[2] == run_tag or (now - mtime > RAY_LITTER_MIN_AGE_SEC and not pid_alive(int(match[3])))):
            doomed.append(name)
    return doomed


def normal_priority() -> tuple[int, str | None]:
    """Ray starts its workers at nice 15 (its worker_niceness), and a model's worker would inherit
    it: beside any process at normal priority it gets a few percent of a core (a YOLO11n forward
    took 10 s instead of 0.1 s beside two busy processes). Back to nice 0 where this process may
    (root, CAP_SYS_NICE or RLIMIT_NICE); else the niceness it runs at and what to do."""
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if now <= 0:
        return now, None
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
        return 0, None
    except OSError:
        return now, (f"ran at nice {now} (Ray's worker niceness), below other processes on its node: start the "
                     f"node with {RAY_NICENESS_ENV}=0 in the environment of `ray start`")


def node_threads(requested: int | None, node_ray_cpus: float, usable: int) -> int | None:
    """A model's CPU threads on a Ray node: --threads when given, else the CPUs the node offers Ray
    (`ray start --num-cpus`), at most those its process may use. Several nodes on one machine then
    share its cores instead of each spinning a thread per core (OpenMP threads that wait for a
    descheduled sibling made a forward 100x slower). None (all usable CPUs) when the node says nothing."""
    if requested:
        return requested
    return max(1, min(usable, int(node_ray_cpus))) if node_ray_cpus >= 1 else None


def ray_host_port(address: str) -> tuple[str, int] | None:
    """Host and port of a 'HOST:PORT' Ray address ('[v6]:PORT' too); None for any other form."""
    match = re.fullmatch(r"\[?([^\[\]\s/]+?)\]?:(\d{1,5})", address.strip())
    return (match[1], int(match[2])) if match else None


def ray_token_source(environ: dict[str, str], home: Path) -> str | None:
    """Where Ray takes the cluster token from on this machine, in Ray's documented order (the
    RAY_AUTH_TOKEN variable, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token),
    or None when there is none."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = Path(environ["RAY_AUTH_TOKEN_PATH"]) if environ.get("RAY_AUTH_TOKEN_PATH") else home / RAY_TOKEN_FILE
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.read_text(encoding="utf-8").strip():
            return str(path)
    return None


def ray_auth_advice(address: str, environ: dict[str, str], token_source: str | None) -> str:
    """One line: the cluster wants a token this machine does not have (or refused the one it has), and the fix."""
    fix = ("`ray get-auth-token` on the head node prints the cluster's token: put it in ~/.ray/auth_token here "
           "or set RAY_AUTH_TOKEN to it")
    if token_source:
        return f"the Ray cluster at {address} uses token authentication and refused the token from {token_source}: {fix}"
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    unreadable = f" (RAY_AUTH_TOKEN_PATH={path} cannot be read or is empty)" if path else ""
    return f"the Ray cluster at {address} uses token authentication and this machine has no token{unreadable}: {fix}"


# -- Ray calls --------------------------------------------------------------------------


def import_ray():
    """The ray package, or the fix (exit 2) when it is not installed here."""
    try:
        import ray
    except ImportError as e:
        raise UsageError(f"--executor ray needs the ray package, which cannot be imported here ({e}): install it "
                         f"(python -m pip install 'ray>=2.60', as in requirements.txt) on this machine and on every "
                         f"node, or run without --executor ray") from None
    return ray


def tcp_problem(host: str, port: int) -> str | None:
    """Why nothing takes a TCP connection at host:port within RAY_CONNECT_TIMEOUT_SEC, or None."""
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_SEC).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def set_ray_auth_mode(mode: str | None) -> None:
    """This process's Ray auth mode (RAY_AUTH_MODE; None: unset). Ray reads the variable when it is
    imported; its config is re-read as Ray's own token setup does (authentication_token_setup.py)."""
    from ray._raylet import Config

    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()


def gcs_answer(address: str) -> str:
    """Ask the cluster's GCS for its cluster id once, in this process's auth mode: "ok", "auth" (it
    wants a token, or refused ours) or the error. A token-mode driver on a cluster without token
    auth hangs on its tasks' results, so the mode must match the cluster's."""
    import ray
    from ray._raylet import GcsClient

    with quiet_fds(2):
        try:
            GcsClient(address=address)
            return "ok"
        except ray.exceptions.AuthenticationError:
            return "auth"
        except Exception as e:  # noqa: BLE001 (RpcError and kin: no GCS answers there)
            return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def local_cluster_address() -> str | None:
    """The cluster `ray start` last started on this machine (Ray's own lookup for address "auto"), or None."""
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError):
        return None


def join_cluster(address: str) -> None:
    """Connect to the Ray cluster at HOST:PORT in its own auth mode: without a token when it needs
    none, else with the token Ray finds on this machine. UsageError with the fix when it cannot."""
    import ray

    host_port = ray_host_port(address)
    if host_port is None:
        raise UsageError(f"Ray address {address!r} (--ray-address or RAY_ADDRESS): give the head node's address as "
                         f"HOST:PORT (the port of its `ray start --head --port`, 6379 by default)")
    if problem := tcp_problem(*host_port):
        raise UsageError(f"no Ray cluster answers at {address} (TCP connection: {problem}): check "
                         f"--ray-address (the head node's HOST:PORT) and that `ray start --head` runs there")
    source, asked = ray_token_source(os.environ, Path.home()), os.environ.get("RAY_AUTH_MODE")
    set_ray_auth_mode("disabled")
    answer = gcs_answer(address)
    if answer == "ok" and asked == "token":
        log(f"RAY_AUTH_MODE=token is set here, but the Ray cluster at {address} does not use token authentication: "
            f"connecting without a token (a driver must use the cluster's mode)", "WARNING")
    if answer == "auth" and source:
        set_ray_auth_mode("token")
        answer = gcs_answer(address)
        if answer == "ok":
            log(f"The Ray cluster at {address} uses token authentication: using the token from {source}", "RAY")
    if answer == "auth":
        raise UsageError(ray_auth_advice(address, os.environ, source))
    if answer != "ok":
        raise UsageError(f"{address} takes connections but no Ray cluster answers there ({answer}): check "
                         f"--ray-address (the head node's HOST:PORT of `ray start --head --port`)")
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:  # e.g. a head gone since the probe
        raise UsageError(f"cannot join the Ray cluster at {address}: {(str(e).strip().splitlines() or [''])[0]}") from None


def node_facts() -> dict:
    """Who this cluster node is, for the rows it produces (and its machine key for the history)."""
    env = environment(resolve_cuda_request("auto"))
    return {"hostname": env["hostname"], "gpu_name": env["gpu_name"], "cpu_model": env["cpu_model"],
            "machine_key": machine_key(env), "environment": env}


def node_run_main(job_path: Path, result_path: Path, timeout: str, ray_cpus: str) -> int:
    """On a cluster node (internal): one model through the same supervised worker as a local run.
    Its work files stay in the task's folder (one folder per task to remove, whatever ends it)."""
    die_with_parent()
    job = WorkerJob(**json.loads(job_path.read_text(encoding="utf-8")))
    job.device = str(resolve_cuda_request(job.device))  # auto/cuda: the GPU Ray gave this task, as cuda:0
    job.options = {**job.options, "threads": node_threads(job.options.get("threads"), float(ray_cpus), usable_cpus())}
    niceness, starved = normal_priority()  # before the worker starts: it inherits the niceness
    if starved:
        log(f"{job.class_name} {starved}", "WARNING")
    work_dir = job_path.parent / "node-run"
    work_dir.mkdir(exist_ok=True)
    with termination_signals():
        row = execute_job(job, "process", work_dir, None if timeout == "none" else float(timeout))
    row["niceness"] = niceness
    if starved and row.get("status") == "ok":
        row = {**row, "noisy": True, "noise_reasons": [*row.get("noise_reasons", []), starved]}
    atomic_write_text(result_path, json.dumps({**row, "node": node_facts()}, default=str))
    return EXIT_OK


def node_preflight_main(request: str) -> int:
    """On a cluster node (internal): what the selected models lack there, and who the node is, as one JSON line."""
    ask = json.loads(request)
    device = torch.device("cpu")
    benches = [c(device, ask["weights"], Path(ask["models_dir"])) for c in resolve_models(ask["models"])]
    print(json.dumps({"problems": check_requirements(benches), "facts": node_facts(),
                      "backend_problems": node_backend_problems(ask.get("backends", ["torch"]), ask.get("device", "cpu"))},
                     default=str))
    return EXIT_OK


def node_backend_problems(backends: list[str], request: str) -> list[str]:
    """What a node lacks for the run's backends on the device it resolves --device to."""
    try:
        device_type = resolve_cuda_request(request).type
    except UsageError as e:
        return [str(e)]
    if problem := backend_problem(backends, device_type, RunOptions()):
        return [problem]
    return backend_preflight(backends, device_type)


# The Ray tasks below are shipped by value and use nothing of this module (a function they need
# comes as an argument): a node needs this program's dependencies, not this file at a path (its
# text travels with the task). Their folders are named vision-bench-<kind>-<run tag>-<pid>-.

def ray_model_task(script: str, images: list, job: dict, timeout: str, run_tag: str, pull_files: bool):
    """Run one model on this node through `--node-run` (this program and the images written to a
    folder of this task's). Yields where it runs first (a task that dies is named by its node), then its row."""
    import json, os, shutil, subprocess, sys, tempfile, time  # noqa: E401 (a task imports what it uses)
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    yield {"node_id": node_id, "pid": os.getpid()}
    ray_cpus = next((n.get("Resources", {}).get("CPU") for n in ray.nodes() if n.get("NodeID") == node_id), None)
    started, node_viz = time.time(), None
    tmp = tempfile.mkdtemp(prefix=f"vision-bench-task-{run_tag}-{os.getpid()}-")
    try:
        paths = {name: os.path.join(tmp, name) for name in ("unified_benchmark.py", "job.json", "row.json")}
        with open(paths["unified_benchmark.py"], "w", encoding="utf-8") as f:
            f.write(script)
        os.mkdir(os.path.join(tmp, "images"))
        for name, data in images:
            with open(os.path.join(tmp, "images", name), "wb") as f:
                f.write(data)
        job = {**job, "images": [os.path.join(tmp, "images", name) for name, _ in images]}
        if pull_files:  # the driver's folder is not shared: write here, the driver pulls the files
            node_viz = job["viz_dir"] = tempfile.mkdtemp(prefix=f"vision-bench-viz-{run_tag}-{os.getpid()}-")
        with open(paths["job.json"], "w", encoding="utf-8") as f:
            json.dump(job, f)
        proc = subprocess.run([sys.executable, paths["unified_benchmark.py"], "--node-run", paths["job.json"],
                               paths["row.json"], timeout, str(ray_cpus or 0)], env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if not os.path.exists(paths["row.json"]):
            raise RuntimeError(f"the node's runner exited with code {proc.returncode} without a row")
        with open(paths["row.json"], encoding="utf-8") as f:
            row = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    yield {**row, "node_id": node_id, "node_viz": node_viz, "started_wall": started, "finished_wall": time.time()}


def ray_preflight_task(script: str, request: str, run_tag: str) -> dict:
    """This node's preflight (`--node-preflight`) in a folder of this task's: the models' problems and the node's facts."""
    import json, os, shutil, subprocess, sys, tempfile  # noqa: E401
    import ray

    tmp = tempfile.mkdtemp(prefix=f"vision-bench-task-{run_tag}-{os.getpid()}-")
    try:
        path = os.path.join(tmp, "unified_benchmark.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        proc = subprocess.run([sys.executable, path, "--node-preflight", request], capture_output=True, text=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        return {"error": " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-1:])}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "node_id": ray.get_runtime_context().get_node_id()}


def ray_cleanup_task(run_tag: str, select) -> list[str]:
    """Remove this run's folders from this node's temporary folder (a task killed by ray.cancel or a
    lost worker never ran its own cleanup), and orphans of earlier runs; `select` (ray_temp_litter) decides."""
    import os, shutil, tempfile, time  # noqa: E401

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def newest_mtime(path: str) -> float:  # a live run in another pid namespace still writes in its tree
        newest = os.stat(path, follow_symlinks=False).st_mtime
        for folder, subfolders, _ in os.walk(path):
            for name in subfolders:
                newest = max(newest, os.stat(os.path.join(folder, name), follow_symlinks=False).st_mtime)
        return newest

    root, entries = tempfile.gettempdir(), []
    for entry in os.scandir(root):
        try:
            if entry.name.startswith("vision-bench-") and entry.is_dir(follow_symlinks=False):
                entries.append((entry.name, newest_mtime(entry.path)))
        except OSError:
            continue
    doomed = select(entries, run_tag, alive, time.time())
    for name in doomed:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return doomed


def ray_path_exists(path: str) -> bool:
    import os

    return os.path.exists(path)


def ray_pull_files(folder: str, chunk_bytes: int):
    """Stream a node's folder to the driver as (relative path, offset, bytes) chunks, then delete it."""
    import os
    import shutil

    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                offset = 0
                while True:
                    data = f.read(chunk_bytes)
                    yield os.path.relpath(path, folder), offset, data
                    offset += len(data)
                    if len(data) < chunk_bytes:
                        break
    shutil.rmtree(folder, ignore_errors=True)


class RayFleet:
    """A run on a Ray cluster: one task per (model, node), each in the same worker as a local run.

    Never two models on one node at once (each task takes the node's one RAY_SLOT; CUDA runs also a GPU).
    No task is retried: a node or worker that dies is a crashed row naming the node. Whatever ends
    the run, its temporary folders on the nodes are removed before it disconnects."""

    def __init__(self, cfg: RunConfig, options: RayOptions):
        self.cfg, self.options = cfg, options
        self.started_ray = False
        self.info: dict[str, Any] = {"executor": "ray", "fleet": options.fleet}
        self.run_tag = uuid.uuid4().hex[:8]          # names this run's folders on the nodes
        self.fleet: list[FleetNode] = []
        self.running: dict[Any, int] = {}            # task (its generator) -> its place in the plan
        self.started_on: dict[Any, str] = {}         # task -> the node id it said it runs on
        self.auth_mode_before = os.environ.get("RAY_AUTH_MODE")

    # -- cluster ------------------------------------------------------------------------

    def connect(self) -> None:
        """Join --ray-address (or RAY_ADDRESS, or a cluster `ray start` began on this machine), else
        start a local Ray for this run (one slot)."""
        ray = import_ray()
        if __name__ != "__main__":  # imported (tests, a notebook): ship the task functions by value
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every worker line reaches the console as printed
        requested, from_env = self.options.address, os.environ.get("RAY_ADDRESS", "").strip()
        from_env = "" if from_env == "auto" else from_env
        address = requested if requested != "auto" else from_env or local_cluster_address()
        found_here = requested == "auto" and not from_env
        if found_here and (address is None or ray_host_port(address) is None or tcp_problem(*ray_host_port(address))):
            log("No running Ray cluster found: starting a local one for this run", "RAY")
            os.environ.setdefault(RAY_NICENESS_ENV, "0")  # its workers at normal priority (see normal_priority)
            ray.init(resources={RAY_SLOT: 1}, include_dashboard=False, logging_level="ERROR")
            self.started_ray = True
        else:
            join_cluster(address)
        self.info["ray_address"] = ray.get_runtime_context().gcs_address
        self.info["started_local_ray"] = self.started_ray

    def finish(self) -> None:
        """Stop what still runs, remove this run's folders on its nodes, disconnect (a local Ray
        started for this run stops with it) and put this process's Ray auth mode back."""
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            try:
                self.cancel()
                self.remove_litter()
            finally:
                ray.shutdown()
        if ray is not None and os.environ.get("RAY_AUTH_MODE") != self.auth_mode_before:
            set_ray_auth_mode(self.auth_mode_before)

    def nodes(self) -> list[FleetNode]:
        """The nodes that take models and how (each other alive node is named with the reason)."""
        import ray

        alive = ray.nodes()
        nodes, excluded = fleet_nodes(alive, self.cfg.device_request, self.options.fleet)
        for reason in excluded:
            log(f"Left out {reason}", "WARNING")
        if not nodes:
            need = f"'{RAY_SLOT}'" + (" and a GPU" if self.cfg.device_request.startswith("cuda") else "")
            raise UsageError(f"no node of the Ray cluster at {self.info['ray_address']} offers {need}: start each "
                             f"node with --resources '{{\"{RAY_SLOT}\": 1}}' (and its GPUs for CUDA runs)")
        ordinals = node_ordinals(alive)
        for node in nodes:
            node.ordinal = ordinals.get(node.node_id)
        self.fleet = nodes
        return nodes

    def node(self, node_id: str) -> FleetNode:
        """The FleetNode of an id; a node that joined after the run started gets one of its own."""
        known = next((n for n in self.fleet if n.node_id == node_id), None)
        if known is None:
            import ray

            entry = next((n for n in ray.nodes() if n["NodeID"] == node_id), {"NodeID": node_id, "Resources": {}})
            known = FleetNode(entry, self.fleet[0].device, self.fleet[0].gpu)
            self.fleet.append(known)
        return known

    def task_options(self, placement: Placement) -> dict:
        """A model's task: its node's slot (and a GPU), pinned to its node or to the nodes that have the model."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {"max_retries": 0, **ray_task_resources(placement.gpu)}
        if placement.node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(placement.node.node_id, soft=False)
        elif placement.allowed:
            options["label_selector"] = node_selector(placement.allowed)
        return options

    @staticmethod
    def probe_options(node: FleetNode) -> dict:
        """A small task pinned to a node: it takes no GPU and no benchmark slot."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"max_retries": 0, "num_cpus": 0,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False)}

    # -- preflight and files ------------------------------------------------------------

    def preflight(self, nodes: list[FleetNode], script_ref) -> None:
        """Every node that will run a model checks its weights and dependencies first: a DA-V2 model
        a node lacks is skipped on that node only; anything else stops the run, all problems listed."""
        import ray

        request = json.dumps({"models": ",".join(c.__name__ for c in self.cfg.models), "weights": self.cfg.weights,
                              "models_dir": str(self.cfg.models_dir), "backends": self.cfg.backends,
                              "device": self.cfg.device_request})
        task = ray.remote(ray_preflight_task)
        answers = ray.get([task.options(**self.probe_options(n)).remote(script_ref, request, self.run_tag)
                           for n in nodes])
        problems = []
        for node, answer in zip(nodes, answers):
            if "error" in answer:
                problems.append(f"{node.where}: the preflight failed: {answer['error']}")
                continue
            node.facts = answer["facts"]
            problems += [f"{node.where}: {p}" for p in answer.get("backend_problems", [])]
            for name, found in answer["problems"].items():
                if issubclass(next(c for c in MODEL_REGISTRY if c.__name__ == name), SKIPPABLE):
                    node.skips[name] = found[0]  # the spec's DA-V2 skip, on this node
                    log(f"{name} will be skipped on {node.where}: {found[0]}", "WARNING")
                else:
                    problems += [f"{node.where}: {name}: {p}" for p in found]
        if problems:
            raise preflight_error("on the cluster", problems)
        log(f"Preflight passed on {len(nodes)} node(s)", "RAY")

    def shared_output(self, nodes: list[FleetNode]) -> bool:
        """Whether every node sees the driver's output folder (a probe file written here)."""
        import ray

        if self.options.files != "auto":
            return self.options.files == "shared"
        probe = self.cfg.output_dir / f".vision-bench-probe-{uuid.uuid4().hex}"
        probe.write_text("probe")
        try:
            check = ray.remote(ray_path_exists)
            seen = ray.get([check.options(**self.probe_options(n)).remote(str(probe)) for n in nodes])
        finally:
            probe.unlink(missing_ok=True)
        return all(seen)

    def pull_files(self, row: dict, source: Path, target: Path) -> None:
        """Bring a model's dissection files from its node, one chunk at a time."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        pull = ray.remote(ray_pull_files).options(
            num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(row["node_id"], soft=False))
        chunks = 0
        try:
            for ref in pull.remote(str(source), RAY_CHUNK_BYTES):
                rel, offset, data = ray.get(ref)
                path = target / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "r+b" if offset else "wb") as f:
                    f.seek(offset)
                    f.write(data)
                chunks += 1
        except (ray.exceptions.RayError, OSError) as e:  # the node went, or this disk is full: keep the row
            row["files_transfer"] = f"failed after {chunks} chunk(s): {type(e).__name__}: {str(e).strip()[:200]}"
            log(f"{row['class_name']} on node {row.get('node_label')}: its dissection files did not all arrive "
                f"({row['files_transfer']}); its figures are kept", "WARNING")
        else:
            row["files_transfer"] = f"object store, {chunks} chunk(s) of at most {RAY_CHUNK_BYTES // 1024**2} MB"
        row["viz_dir"] = str(target / row["class_name"])

    def remove_litter(self) -> None:
        """This run's folders on every node it used, removed by one small task per node (a task
        killed by ray.cancel, or whose worker or node died, never ran its own cleanup)."""
        import ray

        if not self.fleet:
            return
        task = ray.remote(ray_cleanup_task)
        refs = {task.options(**self.probe_options(n)).remote(self.run_tag, ray_temp_litter): n for n in self.fleet}
        done, missing = ray.wait(list(refs), num_returns=len(refs), timeout=RAY_CLEANUP_TIMEOUT_SEC)
        for ref in done:
            try:
                removed = ray.get(ref)
            except ray.exceptions.RayError as e:
                log(f"Could not remove this run's temporary folders on {refs[ref].where}: {type(e).__name__}", "WARNING")
                continue
            if removed:
                log(f"Removed {len(removed)} temporary folder(s) of ended tasks on {refs[ref].where}", "CLEANUP")
        for ref in missing:
            log(f"Could not remove this run's temporary folders on {refs[ref].where}: no answer within "
                f"{RAY_CLEANUP_TIMEOUT_SEC:g} s (they are named vision-bench-*-{self.run_tag}-*)", "WARNING")

    # -- the run ------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        """Connect, choose nodes, preflight, plan, run; whatever happens, finish() cleans up after."""
        try:
            self.connect()
            import ray

            nodes = self.nodes()
            script_ref = ray.put(SCRIPT_PATH.read_text(encoding="utf-8"))
            self.preflight(nodes, script_ref)
            self.info["nodes"] = [{"node_id": n.node_id, "label": n.label, "device": n.device, "ordinal": n.ordinal,
                                   "skipped": sorted(n.skips)} for n in nodes]  # ordinal: see node_ordinals
            plan = fleet_plan(self.cfg.models, nodes, self.options.fleet, self.cfg.backends)
            if all(p.skip for p in plan):
                raise UsageError("every selected model would be skipped on every node; nothing to benchmark "
                                 "(see the warnings above)")
            shared = self.shared_output(nodes)
            self.info["files"] = "shared folder" if shared else "object store"
            log(f"{len(nodes)} node(s), fleet {self.options.fleet}, dissection files via {self.info['files']}", "RAY")
            return self.submit_and_collect(plan, script_ref, shared)
        finally:
            self.finish()

    def submit_and_collect(self, plan: list[Placement], script_ref, shared: bool) -> RunOutcome:
        """Start every placed model's task and take each one's messages as they come; a skipped model
        is its row at once. The rows come in plan order."""
        import ray

        task = ray.remote(ray_model_task)
        images_ref = ray.put([(p.name, p.read_bytes()) for p in self.cfg.images])
        timeout = "none" if self.cfg.model_timeout_sec is None else str(self.cfg.model_timeout_sec)
        rows: list[dict | None] = [None] * len(plan)
        for i, placement in enumerate(plan):
            if placement.skip:
                rows[i] = skipped_row(placement)
                log(f"Skipping {placement.name}: {placement.skip}", "SKIP")
                self.cfg.note_finished(rows[i])
                continue
            job = vars(self.cfg.job(placement.cls, placement.backend)) | {"device": placement.device}
            if placement.node is not None:  # the same model on several nodes: a folder per node
                job["viz_dir"] = str(self.cfg.viz_dir / f"node-{placement.node.node_id[:8]}")
            gen = task.options(**self.task_options(placement)).remote(script_ref, images_ref, job, timeout,
                                                                      self.run_tag, not shared)
            self.running[gen] = i
        exit_code = EXIT_OK
        try:
            while self.running:
                ready, _ = ray.wait(list(self.running), num_returns=1, timeout=RAY_POLL_SEC)
                for gen in ready:
                    row = self.next_message(gen, plan[self.running[gen]])
                    if row is None:
                        continue
                    rows[self.running.pop(gen)] = row
                    self.cfg.note_finished(row)  # durable before the next row is taken
                    if row["status"] in FAILED_STATUSES:
                        exit_code = EXIT_MODEL_FAILED
                        if not self.cfg.keep_going:
                            self.cancel(plan, rows)
                            return RunOutcome([r for r in rows if r], exit_code, False)
        except (KeyboardInterrupt, RunInterrupted) as e:
            self.cancel(plan, rows)
            signum = e.signum if isinstance(e, RunInterrupted) else signal.SIGINT
            return RunOutcome([r for r in rows if r], EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM,
                              False, signal.Signals(signum).name)
        return RunOutcome([r for r in rows if r], exit_code, True)

    def next_message(self, gen, placement: Placement) -> dict | None:
        """A task's next message: None for its first (the node it runs on, noted), else its row; a
        task that died is a crashed row naming that node."""
        import ray

        try:
            message = ray.get(next(gen))
        except (StopIteration, ray.exceptions.RayError) as e:
            node_id = self.started_on.get(gen) or (placement.node.node_id if placement.node else None)
            error = e if isinstance(e, ray.exceptions.RayError) else RuntimeError("the task ended without a row")
            row = dead_task_row(placement, self.node(node_id) if node_id else None, error)
            log(row["error"], "ERROR")
            return row
        if "class_name" not in message:  # the task started on its node
            self.started_on[gen] = message["node_id"]
            self.cfg.note_started(placement.cls, placement.backend, self.node(message["node_id"]).label)
            return None
        node = self.node(message["node_id"])
        node.facts = node.facts or {k: v for k, v in message.get("node", {}).items() if k != "environment"}
        row = placed_row(message, node)
        log(f"{placement.name} on node {row['node_label']}: {row['status']}", "RAY")
        node_viz = row.pop("node_viz", None)
        if node_viz and row.get("viz_dir"):  # node_viz: this task's own folder
            target = self.cfg.viz_dir / f"node-{node.node_id[:8]}" if placement.node else self.cfg.viz_dir
            self.pull_files(row, Path(node_viz), target)
        return row

    def cancel(self, plan: list[Placement] | None = None, rows: list[dict | None] | None = None) -> None:
        """Stop every running task (its runner and worker die with it) and give them a moment to end.
        A row a task finished before it was stopped still comes into rows (and the journal)."""
        import ray

        tasks, self.running = dict(self.running), {}
        for gen in tasks:
            ray.cancel(gen, force=True)  # kills the task's process; its runner and worker die with it
        deadline = time.monotonic() + RAY_CANCEL_WAIT_SEC
        for gen, i in tasks.items():  # drain each until its error (cancelled) or its end
            with contextlib.suppress(Exception):
                while ray.wait([gen], timeout=max(0.0, deadline - time.monotonic()))[0]:
                    message = ray.get(next(gen))
                    if "class_name" in message and rows is not None and plan is not None:
                        rows[i] = self.late_row(message, plan[i])

    def late_row(self, message: dict, placement: Placement) -> dict:
        """A row that arrived while its task was being stopped: kept; files that were to come through
        the object store stay on the node (viz_dir None)."""
        row = placed_row(message, self.node(message["node_id"]))
        if row.pop("node_viz", None):
            row["viz_dir"] = None
        self.cfg.note_finished(row)
        log(f"{placement.name} on node {row['node_label']}: {row['status']} (finished as the run stopped)", "RAY")
        return row


def merged_fleet_report(payload: dict, cfg: RunConfig) -> list[Path]:
    """--fleet every-node / every-gpu-type: one cross-machine report, a column per node (its skipped
    and crashed models say so in their cells)."""
    by_node: dict[str, list[dict]] = {}
    for row in payload["results"]:
        if row.get("node_label"):
            by_node.setdefault(row["node_label"], []).append(row)
    payloads = [{"run_id": payload["run_id"], "results": rows,
                 "environment": next((r["node"]["environment"] for r in rows if (r.get("node") or {}).get("environment")),
                                     {})} for rows in by_node.values()]
    return write_merged_report(payloads, list(by_node), cfg.results_dir, cfg.timestamp)


# --------------------------------------------------------------------------------------
# CLI and main
# --------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number; give a positive integer like 5") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; give a positive integer like 5")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number; give a positive number like 600") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not positive; give a positive number like 600")
    return value


def regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"'{text}' is not a regular expression ({e})") from None
    return text


def device_name(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device. Valid: auto, cpu, cuda, cuda:N")
    return text.strip().lower()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="unified_benchmark.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="Models: " + ", ".join(c.SHORT_NAME for c in MODEL_REGISTRY) + ". "
                                   "Exit codes: 0 ok, 1 a model failed, crashed or timed out, 2 usage or input problem, "
                                   "3 another run holds the output folder, 4 a regression with "
                                   "--fail-on-regression, 5 the history unusable with --fail-on-regression, "
                                   "130 interrupted (Ctrl-C), 143 terminated (SIGTERM).")
    parser.add_argument("--models", help="comma-separated model names or class names (default: all eight)")
    parser.add_argument("--images", type=Path, help="folder of .jpg/.jpeg/.png images (default: test_data/)")
    parser.add_argument("--runs", type=positive_int, default=NUM_INFERENCE_RUNS,
                        help=f"inference runs per image (default {NUM_INFERENCE_RUNS})")
    parser.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N (default auto; cuda is the current GPU, cuda:0 in a fresh "
                             "process; with --executor ray each task uses the GPU Ray gives it)")
    parser.add_argument("--weights", choices=["pretrained", "random"], default="pretrained",
                        help="pretrained checkpoints, or the exact architectures with seeded random weights")
    parser.add_argument("--models-dir", type=Path, default=SCRIPT_DIR / "models",
                        help="weight files for YOLO, SAM and the official DA-V2 (default: models/)")
    parser.add_argument("--output-dir", type=Path, default=SCRIPT_DIR,
                        help="where results/ and viz/ go (default: the script's folder)")
    parser.add_argument("--no-dissect", action="store_true", help="skip layer dissection")
    parser.add_argument("--dissect-mode", choices=LayerDissector.MODES, default="single-pass",
                        help="single-pass (default): one forward with hooks on every leaf; "
                             "per-layer: the spec's one forward per leaf module")
    parser.add_argument("--dissect-filter", type=regex, metavar="REGEX",
                        help="files only for outputs whose module name or type matches (metadata for all)")
    parser.add_argument("--dissect-max-mb", type=positive_number, metavar="N",
                        help="per model: stop writing layer files past N MB (metadata continues)")
    parser.add_argument("--keep-viz", type=positive_int, metavar="N",
                        help="after a successful run, remove the oldest viz/<timestamp>/ folders beyond the newest N")
    parser.add_argument("--keep-going", action="store_true",
                        help="record a failed model in the reports and continue (default: stop at the first "
                             "failure; the finished models are reported either way)")
    parser.add_argument("--isolation", choices=ISOLATION_MODES, default="process",
                        help="process (default): each model in a fresh worker process, so cold starts do not "
                             "depend on the order and a crash costs one row; none: all in this process "
                             "(for debuggers and profilers)")
    parser.add_argument("--model-timeout", type=positive_number, metavar="SEC",
                        help="stop a model's worker after SEC seconds and record it as timed_out (default: none)")
    parser.add_argument("--list", action="store_true", help="list the models and whether each is available now")
    deploy = parser.add_argument_group("deployment options (recorded in every report and in the history's key)")
    deploy.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="autocast the forward: fp32 (default), fp16 (CUDA only), bf16 (CUDA and CPU)")
    deploy.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last memory format")
    deploy.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                        help="torch.compile the forward (MODE: default, reduce-overhead, max-autotune); its first "
                             "call is compile_sec, not a latency sample")
    deploy.add_argument("--fuse", action="store_true",
                        help="fuse Conv+BN as Ultralytics' predict() does (YOLO, MobileSAM's encoder; no-op elsewhere)")
    deploy.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU intra-op threads (default: the CPUs this process may use)")
    deploy.add_argument("--backend", type=parse_backends, default="torch", metavar="LIST",  # argparse parses a string default
                        help="what runs the forward, comma separated (each model x backend its own worker and row, "
                             "the first the report's baseline for speed-ups): torch, or the forward exported to ONNX "
                             f"(cached under <models-dir>/{EXPORTS_DIR_NAME}) run by onnxruntime or openvino on the "
                             "CPU, each row with its accuracy cost against fp32 PyTorch; tensorrt is refused "
                             "(default: torch)")
    deploy.add_argument("--parity-layers", action="store_true",
                        help="for a variant (--dtype/--fuse/--channels-last/--compile): compare every layer with the "
                             "fp32 reference and name the first that drifts (always on with dissection)")
    cluster = parser.add_argument_group("many machines (Ray)")
    cluster.add_argument("--executor", choices=EXECUTORS, default="local",
                         help="local (default): this machine; ray: a Ray cluster, one model per GPU or per node")
    cluster.add_argument("--ray-address", default="auto", metavar="ADDRESS",
                         help="the cluster to use (default auto: RAY_ADDRESS or a running local head, else a "
                              "local Ray started for this run)")
    cluster.add_argument("--fleet", choices=FLEET_MODES, default="spread",
                         help="spread (default): the models over the cluster; every-node: the whole suite on "
                              "every node; every-gpu-type: on one node per GPU type; the last two also write "
                              "one merged cross-machine report")
    cluster.add_argument("--ray-files", choices=RAY_FILE_MODES, default="auto",
                         help="how dissection files reach this machine: auto (default: directly when every "
                              "node sees the output folder, else through Ray's object store), shared, object-store")
    history = parser.add_argument_group("history and verdicts")
    history.add_argument("--history", type=Path, metavar="PATH",
                         help=f"run history (SQLite) to store this run in and judge it against "
                              f"(default: results/{HISTORY_FILE_NAME} in the output folder)")
    history.add_argument("--no-history", action="store_true", help="neither store this run nor judge it")
    history.add_argument("--history-keep-runs", type=positive_int, metavar="N",
                         help=f"after storing this run, delete the history's runs older than the newest N, with "
                              f"their samples and verdicts (default: keep every run; verdicts compare against up to "
                              f"{BASELINE_MAX_RUNS} earlier runs and need {BASELINE_MIN_RUNS}; the drift rule reads up "
                              f"to {DRIFT_WINDOW_RUNS} and needs {DRIFT_MIN_RUNS}; the trend site's table compares "
                              f"with the run {SITE_CHANGE_RUNS[1]} runs before)")
    history.add_argument("--fail-on-regression", action="store_true",
                         help=f"exit {EXIT_REGRESSION} when any verdict is 'regression' or 'drifting', {EXIT_HISTORY_UNUSABLE} when "
                              f"the history could not be read or written (for cron mail)")
    tools = parser.add_argument_group("tools (run no model)").add_mutually_exclusive_group()
    tools.add_argument("--import-reports", type=Path, metavar="DIR",
                       help="load DIR's benchmark_results_*.json into the history (idempotent)")
    tools.add_argument("--compare", nargs=2, metavar=("A", "B"),
                       help="compare two runs (report JSON files or run ids in the history), per model")
    tools.add_argument("--merge", nargs="+", metavar="FILE",
                       help="merge report JSON files from several machines into one report")
    tools.add_argument("--history-site", action="store_true",
                       help=f"write results/{SITE_FILE_NAME}, the trend site of every run in the history, from the "
                            f"history alone (every run also writes it)")
    tools.add_argument("--recover", action="store_true",
                       help="write the reports of runs in the output folder that died before writing them (from "
                            "their progress journals; every run also does this first), then exit")
    return parser


def resolve_device(name: str, on_ray: bool = False) -> torch.device:
    """--device on this machine, indexed (cuda -> cuda:<current>); on Ray the driver checks only the
    request (each node resolves auto/cuda itself) and records it unresolved, or cpu."""
    if on_ray:
        request = ray_device_request(name)
        return torch.device("cpu") if request == "auto" else torch.device(request)
    device = resolve_cuda_request(name)
    if name == "auto":
        log("Using CUDA device " + str(device) if device.type == "cuda" else
            "CUDA not available, falling back to CPU. Performance will be significantly slower.",
            "INFO" if device.type == "cuda" else "WARNING")
    return device


def preflight(classes: list[type[ModelBenchmark]], args: argparse.Namespace, device: torch.device) -> dict[str, str]:
    """Check every selected model's needs at once; DA-V2 problems become skips (the spec)."""
    benches = [cls(device, args.weights, args.models_dir) for cls in classes]
    problems = check_requirements(benches)
    skips, fatal = {}, []
    for bench in benches:
        name = type(bench).__name__
        for problem in problems.get(name, []):
            if isinstance(bench, SKIPPABLE):
                skips[name] = problem
                log(f"{name} will be skipped: {problem}", "WARNING")
            else:
                fatal.append(f"{name}: {problem}")
    if fatal:
        raise UsageError(f"preflight found {len(fatal)} problem(s); nothing was run:\n  - " + "\n  - ".join(fatal))
    if len(skips) == len(classes):
        raise UsageError("every selected model would be skipped; nothing to benchmark (see the warnings above)")
    return skips


def print_model_list(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    benches = [cls(device, args.weights, args.models_dir) for cls in MODEL_REGISTRY]
    problems = check_requirements(benches)
    log(f"{'name':<16}{'class':<32}{'input':>6}  {'weights (' + args.weights + ')':<56} available", "")
    for bench in benches:
        name = type(bench).__name__
        status = "yes" if name not in problems else "no: " + problems[name][0]
        log(f"{bench.SHORT_NAME:<16}{name:<32}{bench.INPUT_SIZE:>6}  {bench.weight_source:<56} {status}", "")


def prepare_output(output_dir: Path, dissect: bool) -> None:
    """Create results/ (and viz/) and prove they are writable before any model runs."""
    folders = [output_dir / "results"] + ([output_dir / "viz"] if dissect else [])
    for folder in folders:
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise OutputError(f"output folder {folder} is not writable: {e.strerror or e}. "
                              f"Fix its permissions or pass --output-dir DIR") from e


class RunLock:
    """One run per output folder (cron overlap); the kernel drops the lock of a killed run."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create lock file {self.path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("ascii", "replace").strip() or "unknown process"
            os.close(fd)
            raise LockedError(f"another vision-bench run holds {self.path.parent} ({holder}); "
                              f"wait for it to finish or use another --output-dir") from None
        stale = os.pread(fd, 4096, 0).decode("ascii", "replace").strip()
        if stale:
            log(f"Taking over a stale lock left by a run that ended without releasing it ({stale})", "WARNING")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now().isoformat(timespec='seconds')}"
                      .encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # an empty lock file means a clean exit
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def claim_timestamp(output_dir: Path) -> str:
    """A timestamp no earlier run used in this folder (two runs in one second: wait a second)."""
    while True:
        stamp = get_timestamp()
        taken = (output_dir / "viz" / stamp).exists() or any((output_dir / "results").glob(f"*_{stamp}.*"))
        if not taken:
            return stamp
        time.sleep(1.0 - datetime.now().microsecond / 1e6 + 0.01)


class AsciiStream(io.TextIOBase):
    """Wraps stdout/stderr: strips ANSI colours and replaces non-ASCII (emojis) with '?'."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(ANSI_ESCAPE.sub("", text).encode("ascii", "replace").decode("ascii"))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False  # libraries then print no colours

    def fileno(self) -> int:
        return self._stream.fileno()


@contextlib.contextmanager
def plain_output():
    """Plain ASCII output from us and from third-party libraries, restored afterwards."""
    os.environ.setdefault("YOLO_VERBOSE", "False")       # read when ultralytics is first imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import logging

    logging.getLogger("ultralytics").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = AsciiStream(stdout), AsciiStream(stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def run_options(args: argparse.Namespace, device: torch.device, on_ray: bool = False) -> RunOptions:
    """The deployment options, checked against the device and --backend (on Ray each node checks
    its device). A worker's own backend is set per row (RunConfig.job)."""
    options = RunOptions(dtype=args.dtype, channels_last=args.channels_last, compile=args.compile, fuse=args.fuse,
                         threads=args.threads)
    if not on_ray:
        options.check(device, UsageError, args.backend)
    if not on_ray and (problems := backend_preflight(args.backend, device.type)):
        raise preflight_error("on this machine", problems)
    return options


def work_folder_prefix(output_dir: Path) -> str:
    """The name a run's temporary work folder begins with: one per output folder, so only a run
    holding that folder's lock ever owns one."""
    return f"vision-bench-run-{hashlib.sha256(str(output_dir).encode()).hexdigest()[:12]}-"


def remove_dead_work_folders(output_dir: Path) -> None:
    """Under the output folder's lock: remove work folders of earlier runs on it (a run killed by
    SIGKILL or a power loss never removed its own; no live run can own one, it would hold the lock)."""
    for folder in Path(tempfile.gettempdir()).glob(work_folder_prefix(output_dir) + "*"):
        shutil.rmtree(folder, ignore_errors=True)
        log(f"Removed {folder}, the work folder of an earlier run in {output_dir} that died", "CLEANUP")


def run(args: argparse.Namespace) -> int:
    classes = resolve_models(args.models)
    if args.list:
        print_model_list(args)
        return EXIT_OK
    on_ray = args.executor == "ray"
    if on_ray and args.isolation == "none":
        raise UsageError("--isolation none runs the models in this process; on a Ray cluster every model runs in "
                         "a worker on its node: leave out --isolation or --executor ray")
    if args.model_timeout and args.isolation == "none":
        raise UsageError("--model-timeout stops a model's worker process, and --isolation none runs the models in "
                         "this one: leave out one of them")
    if args.fail_on_regression and args.no_history:
        raise UsageError("--fail-on-regression judges against the history, and --no-history turns it off: "
                         "leave out one of them")
    device = resolve_device(args.device, on_ray)
    options = run_options(args, device, on_ray)
    images, image_source = discover_images(args.images)
    skips = {} if on_ray else preflight(classes, args, device)  # on Ray, each node checks itself
    output_dir = args.output_dir.resolve()
    prepare_output(output_dir, not args.no_dissect)
    lock, cfg = RunLock(output_dir), None
    lock.acquire()
    try:
        remove_dead_work_folders(output_dir)
        recover_dead_runs(output_dir)
        with tempfile.TemporaryDirectory(prefix=work_folder_prefix(output_dir)) as work_dir:
            history = history_path(args, output_dir)
            cfg = RunConfig(models=classes, images=images, image_source=image_source, runs=args.runs, device=device,
                            weights=args.weights, models_dir=args.models_dir.resolve(), output_dir=output_dir,
                            dissect=not args.no_dissect, dissect_mode=args.dissect_mode, keep_going=args.keep_going,
                            isolation=args.isolation, model_timeout_sec=args.model_timeout, work_dir=Path(work_dir),
                            timestamp=claim_timestamp(output_dir), skips=skips, device_request=args.device,
                            dissect_filter=args.dissect_filter, dissect_max_mb=args.dissect_max_mb,
                            parity_layers=args.parity_layers,
                            started_at=datetime.now().isoformat(timespec="microseconds"), options=options,
                            backends=args.backend,
                            history=str(history) if history else None, history_keep_runs=args.history_keep_runs,
                            keep_viz=args.keep_viz,
                            executor_info={"executor": "ray", "fleet": args.fleet} if on_ray else {"executor": "local"})
            per_backend = f" x {len(cfg.backends)} backends" if len(cfg.backends) > 1 else ""
            log(f"Run {cfg.timestamp}: {len(classes)} model(s){per_backend}, {len(images)} image(s), {cfg.runs} run(s) "
                f"per image, {cfg.weights} weights, device {device}, isolation {cfg.isolation}, "
                f"options {options_text(options, cfg.backends)}")
            env = environment(device)
            if not on_ray:  # on a cluster the models run side by side, and a node's own history is elsewhere
                cfg.expected_wall_sec = expected_wall_times(cfg, machine_key(env))
            cfg.journal = RunJournal(cfg.results_dir / f"{JOURNAL_PREFIX}{cfg.timestamp}.jsonl",
                                     {"config": cfg.record(), "environment": env, "image_set": image_fingerprints(images)})
            start = time.perf_counter()
            with termination_signals():
                if on_ray:
                    fleet = RayFleet(cfg, RayOptions(args.ray_address, args.fleet, args.ray_files))
                    outcome = fleet.run()
                    cfg.executor_info = fleet.info
                else:
                    outcome = run_benchmark(cfg)
            total_time_sec = time.perf_counter() - start
        cfg.journal.ended(outcome.complete, outcome.exit_code, outcome.interrupted_by)
        payload, paths = report_run(outcome, cfg, total_time_sec, env)
        cfg.journal.discard()
        print_changes(payload)
        print_summary(outcome, cfg, total_time_sec, paths)
        return run_exit_code(outcome.exit_code, payload, args.fail_on_regression)
    finally:
        if cfg is not None and cfg.journal:
            cfg.journal.close()
        lock.release()


def report_run(outcome: RunOutcome, cfg: RunConfig, total_time_sec: float, env: dict,
               extra: dict | None = None, source: str = "run") -> tuple[dict, list[Path]]:
    """Judge a run against the history, write its reports (a stopped or interrupted run's too,
    marked incomplete), then store it in the history: its payload and the files written."""
    payload = {**report_payload(outcome, cfg, total_time_sec, env), **(extra or {})}
    trends = judge_against_history(payload, Path(cfg.history) if cfg.history else None)
    paths = generate_reports(payload, cfg, trends)
    if cfg.executor_info.get("fleet", "spread") != "spread":
        paths += merged_fleet_report(payload, cfg)
    store_in_history(payload, source, cfg.history_keep_runs)
    if cfg.keep_viz and outcome.complete and outcome.exit_code == EXIT_OK:  # before the site links to them
        prune_viz(cfg.output_dir / "viz", cfg.keep_viz)
    if payload["verdicts"] is not None and not payload.get("history_note"):
        paths += refresh_trend_site(Path(cfg.history), cfg.results_dir)
    return payload, paths


def refresh_trend_site(history: Path, site_dir: Path) -> list[Path]:
    """The trend site after a run has been stored; a failure is a warning (the reports are written)."""
    try:
        return [write_trend_site(history, site_dir)]
    except Exception as e:  # noqa: BLE001 - the run is stored and its reports written: never lose them to the site
        log(f"The trend site {site_dir / SITE_FILE_NAME} could not be written ({type(e).__name__}: {e}); "
            f"python unified_benchmark.py --history-site writes it from the history", "WARNING")
        return []


def run_exit_code(model_exit_code: int, payload: dict, fail_on_regression: bool) -> int:
    """The run's exit code: a failed or interrupted model's first; then, with --fail-on-regression,
    a history that could not be used (judging was asked and impossible), then a regression."""
    if model_exit_code != EXIT_OK or not fail_on_regression:
        return model_exit_code
    if payload.get("history_note"):
        log(f"--fail-on-regression, and this run could not be judged: {payload['history_note']}: exit "
            f"{EXIT_HISTORY_UNUSABLE}", "ERROR")
        return EXIT_HISTORY_UNUSABLE
    regressions = [v for v in payload.get("verdicts") or [] if v["verdict"] in FAILING]
    if regressions:
        log(f"{len(regressions)} regression(s) or drift(s) and --fail-on-regression: exit {EXIT_REGRESSION}", "ERROR")
        return EXIT_REGRESSION
    return EXIT_OK


def recover_dead_runs(output_dir: Path) -> int:
    """Reports and a history entry for every run whose journal is still in results/: it died (or
    failed) before writing them. Called with the folder's lock held, so no live run owns these
    journals. A journal that cannot be recovered is renamed aside, named; returns how many were."""
    failed = 0
    for journal in sorted((output_dir / "results").glob(f"{JOURNAL_PREFIX}*.jsonl")):
        try:
            recover_run(journal)
        except Exception as e:  # whatever is wrong with one journal, later runs must not trip on it
            aside = journal.with_name(journal.name + ".unrecoverable")
            with contextlib.suppress(OSError):
                journal.rename(aside)
            log(f"The journal {journal} of a run that died could not be recovered ({type(e).__name__}: {e}); "
                f"moved aside to {aside.name}", "WARNING")
            failed += 1
    return failed


def recovered_config(header: dict, journal: Path) -> RunConfig:
    """The dead run's configuration, its output folder (and a history inside it) where the journal is now."""
    record, output_dir = dict(header["config"]), journal.parent.parent
    old = Path(record["output_dir"])
    if record.get("history") and Path(record["history"]).is_relative_to(old):
        record["history"] = str(output_dir / Path(record["history"]).relative_to(old))
    return RunConfig.from_record({**record, "output_dir": str(output_dir)})


def recover_run(journal: Path) -> list[Path]:
    """One dead run from its journal: its finished rows reported under its own timestamp, marked
    incomplete and naming what was lost, and stored in the history as incomplete (never a baseline).
    The journal is deleted once reports and history entry are written."""
    dead = read_journal(journal)
    header, ended = dead["header"], dead["ended"]
    cfg = recovered_config(header, journal)
    lost = lost_models([run_key(c.__name__, b) for c, b in cfg.units], dead["started"], dead["rows"])
    how = "failed to write its reports" if ended else "died before writing its reports"
    log(f"Run {cfg.timestamp} {how}; recovering {len(dead['rows'])} finished model(s) from {journal}"
        + (f"; lost: {', '.join(lost)}" if lost else "")
        + (f"; {dead['torn_lines']} torn line(s) ignored" if dead["torn_lines"] else ""), "RECOVER")
    report = cfg.results_dir / f"benchmark_results_{cfg.timestamp}.json"
    if report.exists():  # written last: the run's reports are all there, perhaps not its history entry
        payload = {**payload_from_report(report), "history": cfg.history, "verdicts": []}
        if cfg.history:
            store_in_history(payload, "run" if payload.get("complete") else "recovered", cfg.history_keep_runs)
        if not payload.get("history_note"):
            journal.unlink()
        log(f"Run {cfg.timestamp}'s reports were written before it ended: left as they are", "RECOVER")
        return []
    outcome = (RunOutcome(dead["rows"], ended["exit_code"], ended["complete"], ended["interrupted_by"]) if ended else
               RunOutcome(dead["rows"], EXIT_MODEL_FAILED, False, "its death (SIGKILL, out of memory or power loss)"))
    recovered = {"journal": str(journal), "recovered_at": datetime.now().isoformat(timespec="seconds"),
                 "lost": lost, "torn_lines": dead["torn_lines"], "how": how}
    payload, paths = report_run(outcome, cfg, dead["last_wall_time"] - header["wall_time"], header["environment"],
                                {"image_set": header["image_set"], "recovered": recovered}, source="recovered")
    if payload.get("history_note"):
        log(f"The journal {journal} is kept: the history could not take the run (the next run tries again)", "RECOVER")
    else:
        journal.unlink()
    log(f"Run {cfg.timestamp} recovered, marked {'complete' if outcome.complete else 'incomplete'}: "
        + ", ".join(str(p) for p in paths), "RECOVER")
    return paths


def prune_viz(viz_root: Path, keep: int) -> list[Path]:
    """--keep-viz: remove the oldest viz/<YYYYMMDD_HHMMSS>/ folders beyond the newest `keep`
    (only after a successful run; other folders are never touched)."""
    runs = sorted(p for p in viz_root.glob("*") if p.is_dir() and re.fullmatch(r"\d{8}_\d{6}", p.name))
    doomed = runs[:-keep] if keep < len(runs) else []
    for folder in doomed:
        shutil.rmtree(folder)
        log(f"Removed {folder} (--keep-viz {keep})", "CLEANUP")
    return doomed


def history_path(args: argparse.Namespace, output_dir: Path) -> Path | None:
    """The history this run uses (None: --no-history); warns when --history-keep-runs keeps too
    few runs for the drift rule."""
    if args.no_history:
        return None
    if args.history_keep_runs and args.history_keep_runs < DRIFT_MIN_RUNS:
        log(f"--history-keep-runs {args.history_keep_runs} keeps fewer runs than the slow-drift rule needs "
            f"({DRIFT_MIN_RUNS}, of up to {DRIFT_WINDOW_RUNS}): no run will be judged 'drifting'", "WARNING")
    return (args.history or output_dir / "results" / HISTORY_FILE_NAME).resolve()


def judge_against_history(payload: dict, path: Path | None) -> dict[str, list[dict]]:
    """Judge every ok model against its earlier runs (payload["verdicts"]); returns each model's
    trend for the plots. Reads only: the run is stored after its reports are written. A history
    that cannot be used is a warning, and the reports still come."""
    payload["history"] = str(path) if path else None
    payload["verdicts"] = None
    if path is None:
        return {}
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    try:
        store = HistoryStore(path) if path.exists() else None
        try:
            verdicts, trends = [], {}
            for row in ok:
                earlier = store.earlier(payload, row) if store else []
                judged = [{**v, "machine_key": row_machine_key(payload, row)}
                          for v in judge_model(row, earlier, (row.get("node") or payload)["environment"])]
                warm = next(v for v in judged if v["metric"] == "warm latency")
                trends[row_key(row)] = (store.trend(payload, row) if store else []) + [
                    {"started_at": payload["started_at"], "warm_median_sec": row["warm_median_sec"], **warm}]
                verdicts += judged
            if store:
                payload["history_size"] = store.size()  # before this run is added
        finally:
            if store:
                store.close()
    except (BenchError, sqlite3.Error, OSError) as e:
        advice = f": {history_advice(str(e))}" if isinstance(e, sqlite3.Error) else ""
        payload["history_note"] = f"The run history could not be used: {e}{advice}"
        log(payload["history_note"], "WARNING")
        return {}
    payload["verdicts"] = verdicts
    return trends


def store_in_history(payload: dict, source: str = "run", keep_runs: int | None = None) -> None:
    """Add the run, its raw samples and its verdicts to the history (after its reports), then
    (--history-keep-runs) delete the runs older than the newest keep_runs; a failure is a warning
    and the payload's history_note (the exit code reads it)."""
    if payload["verdicts"] is None:  # --no-history, or a history that could not be used
        return
    try:
        store = HistoryStore(Path(payload["history"]))
        try:
            store.add_run(payload, source)
            store.add_verdicts(payload["run_id"], payload["verdicts"])
            pruned = store.prune(keep_runs) if keep_runs else 0
            size = store.size()
        finally:
            store.close()
    except (BenchError, sqlite3.Error, OSError) as e:
        advice = f": {history_advice(str(e))}" if isinstance(e, sqlite3.Error) else ""
        payload["history_note"] = f"this run could not be added to the history {payload['history']}: {e}{advice}"
        log(payload["history_note"], "WARNING")
        return
    log(f"Stored in the history {payload['history']}: {size['history_runs']} run(s), {size['history_mb']:.2f} MB"
        + (f"; {pruned} older run(s) deleted (--history-keep-runs {keep_runs})" if pruned else ""), "HISTORY")


def run_tool(args: argparse.Namespace) -> int:
    """--import-reports, --compare and --merge: work on reports and the history, run no model."""
    output_dir = args.output_dir.resolve()
    if args.recover:
        return recover_tool(output_dir)
    if args.history_site:
        path = history_path(args, output_dir)
        if path is None or not path.is_file():
            raise UsageError(f"--history-site: no history at {path or 'all (--no-history)'}: run a benchmark first, "
                             f"or pass --history PATH")
        (output_dir / "results").mkdir(parents=True, exist_ok=True)
        log(f"Trend site written to {write_trend_site(path, output_dir / 'results')}")
        return EXIT_OK
    if args.import_reports:
        path = history_path(args, output_dir)
        if path is None:
            raise UsageError("--import-reports needs the history: leave out --no-history")
        store = HistoryStore(path)
        try:
            added, present = import_reports(store, args.import_reports)
        finally:
            store.close()
        log(f"Imported {added} report(s) from {args.import_reports} into {path} ({present} already there)")
        return EXIT_OK
    prepare_output(output_dir, dissect=False)
    stamp = claim_timestamp(output_dir)
    if args.compare:
        a, b = (load_run(ref, history_path(args, output_dir)) for ref in args.compare)
        rows, same_machine = compare_rows(a, b)
        lines = comparison_text(a, b, rows, same_machine)
        for line in lines:
            log(line, "")
        path = output_dir / "results" / f"comparison_{stamp}.md"
        atomic_write_text(path, "\n".join(lines) + "\n")
        log(f"Comparison written to {path}")
        return EXIT_OK
    payloads = [read_report(Path(f)) for f in args.merge]
    for path in write_merged_report(payloads, [run_label(p) for p in payloads], output_dir / "results", stamp):
        log(f"Merged report written to {path}")
    return EXIT_OK


def recover_tool(output_dir: Path) -> int:
    """--recover: the dead runs' reports, under the folder's lock (a live run's journal is its own)."""
    if not (output_dir / "results").is_dir():
        raise UsageError(f"--recover: {output_dir / 'results'} does not exist: pass the --output-dir of the run")
    lock = RunLock(output_dir)
    lock.acquire()
    try:
        journals = sorted((output_dir / "results").glob(f"{JOURNAL_PREFIX}*.jsonl"))
        if not journals:
            log(f"Nothing to recover in {output_dir / 'results'}: no run died there before writing its reports")
        failed = recover_dead_runs(output_dir)
    finally:
        lock.release()
    return EXIT_MODEL_FAILED if failed else EXIT_OK


def exit_at_once(code: int) -> None:
    """End a worker or builder process once its work is on the pipe or on disk: output flushed,
    without the interpreter's teardown of torch and the model libraries (about a second, during
    which the runner would wait before the next model)."""
    flush_streams()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    with plain_output():
        if argv[:1] == ["--worker"]:  # internal: one model's worker process (see WorkerProcess)
            exit_at_once(worker_main(Path(argv[1]), int(argv[2])))
        if argv[:1] == ["--build-random"]:  # internal: see prepare_random_checkpoint
            exit_at_once(build_random_main(argv[1], Path(argv[2])))
        if argv[:1] == ["--node-run"]:  # internal: one model on a Ray node (see ray_model_task)
            return node_run_main(Path(argv[1]), Path(argv[2]), argv[3], argv[4])
        if argv[:1] == ["--node-preflight"]:  # internal: see RayFleet.preflight
            return node_preflight_main(argv[1])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        except BenchError as e:
            log(str(e), "ERROR")
            return e.exit_code
        try:
            if args.import_reports or args.compare or args.merge or args.recover or args.history_site:
                return run_tool(args)
            return run(args)
        except BenchError as e:
            log(str(e), "ERROR")
            return e.exit_code
        except KeyboardInterrupt:
            log("Interrupted (SIGINT)", "ERROR")
            return EXIT_SIGINT
        except RunInterrupted as e:
            log(f"Interrupted ({e})", "ERROR")
            return EXIT_SIGTERM


def exit_main(code: int) -> None:
    """End the program with code once main() has returned: exit handlers run (Ray's shutdown among
    them), then exit_at_once, skipping the interpreter's teardown of torch and the model libraries
    (a second per run, over and over for a cron job or a test suite). With a thread of our own still
    running, the normal exit waits for it instead."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's: what a normal exit runs
    if others or run_exit_handlers is None:
        sys.exit(code)
    run_exit_handlers()
    exit_at_once(code)


if __name__ == "__main__":
    exit_main(main())
