"""Shared fixtures: real photos, small output folders, and a main() runner.

Tests never touch the network: HF_HUB_OFFLINE=1 is set for the whole session, and the
heaviest architectures run in their reduced configuration (VISION_BENCH_REDUCED_CONFIG=1,
documented in the README); full-size ones are checked on the meta device.
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["YOLO_VERBOSE"] = "False"
os.environ["VISION_BENCH_REDUCED_CONFIG"] = "1"
# Built random checkpoints are shared by the session's runs (as by a user's), never the user's cache.
os.environ["VISION_BENCH_CACHE"] = tempfile.mkdtemp(prefix="vision-bench-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import unified_benchmark as ub  # noqa: E402
from ultralytics.utils import ASSETS  # noqa: E402

BUS = Path(ASSETS) / "bus.jpg"
ZIDANE = Path(ASSETS) / "zidane.jpg"


@pytest.fixture
def bus_image() -> Image.Image:
    return ub.decode_image(BUS)


@pytest.fixture
def one_image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(BUS, folder / "bus.jpg")
    return folder


@pytest.fixture
def two_image_dir(one_image_dir) -> Path:
    shutil.copy(ZIDANE, one_image_dir / "zidane.jpg")
    return one_image_dir


@pytest.fixture
def cpu() -> torch.device:
    return torch.device("cpu")


@pytest.fixture(scope="session")
def eight_models(tmp_path_factory) -> tuple[int, str, dict]:
    """All eight models with random weights, one run each on one photo, each in its worker:
    (exit code, everything printed, the JSON report). Shared by the tests that read such a run."""
    root = tmp_path_factory.mktemp("eight-models")
    (root / "images").mkdir()
    shutil.copy(BUS, root / "images" / "bus.jpg")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = ub.main(["--weights", "random", "--runs", "1", "--no-dissect", "--images", str(root / "images"),
                        "--output-dir", str(root / "out")])
    return code, printed.getvalue(), load_report(root / "out")


def write_yolo_checkpoint(cls, path: Path) -> int:
    """An Ultralytics checkpoint of the real architecture (as Ultralytics stores it: half precision)."""
    model = cls(torch.device("cpu"), "random")._build_random()
    torch.save({"model": model.half(), "train_args": {}}, path)
    return sum(p.numel() for p in model.parameters())


def run_main(capsys, *args: str) -> tuple[int, str]:
    """main() in this process; returns the exit code and everything printed."""
    code = ub.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """The program as a user runs it, in a fresh process."""
    return subprocess.run([sys.executable, str(REPO / "unified_benchmark.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kwargs)


def load_report(output_dir: Path) -> dict:
    (path,) = sorted((output_dir / "results").glob("benchmark_results_*.json"))[-1:]
    return json.loads(path.read_text())


HOG = "while True: pass"


def start_hog(index: int) -> subprocess.Popen:
    """A CPU-burning process pinned to one of this process's cores (one per core: the scheduler
    cannot put two hogs on one core and leave the benchmark a free one)."""
    cpus = sorted(os.sched_getaffinity(0))
    return subprocess.Popen([sys.executable, "-c", HOG],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpus[index % len(cpus)]}))


def start_cli(*args, env: dict | None = None) -> subprocess.Popen:
    """The program as a user runs it, in a fresh process whose output a test reads as it comes."""
    return subprocess.Popen([sys.executable, str(REPO / "unified_benchmark.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def read_until(proc, pattern: str, lines: list[str], timeout: float = 120) -> re.Match:
    """Read a started program's output line by line (kept in lines) until one matches pattern."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if match := re.search(pattern, line):
            return match
    proc.kill()
    pytest.fail(f"never saw {pattern!r}:\n{''.join(lines)}")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over about 30 s here; `-m 'not slow'` is the quick subset")


def skip_unless_ci(reason: str) -> None:
    """Skip a test this machine cannot run; in CI (CI set), where everything it needs is
    installed, the same gap is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["VISION_BENCH_CACHE"], ignore_errors=True)


BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def need_a_browser() -> None:
    if BROWSER is None:
        skip_unless_ci("no Chromium here: apt-get install chromium-headless-shell (.ci/run installs it)")


def chromium(*args: str) -> str:
    """A real headless Chromium: the page's DOM after its scripts ran (--dump-dom), or a screenshot."""
    proc = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def body_data(dom: str) -> dict[str, str]:
    """The data-* attributes a page's script wrote on its <body>."""
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))
