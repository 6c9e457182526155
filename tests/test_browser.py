"""The layer browser (viz/<ts>/<ClassName>/index.html) in a real headless browser."""

import json
import re
import shutil

import pytest
from PIL import Image
from conftest import BUS, body_data, chromium, load_report, need_a_browser, ub


@pytest.fixture(autouse=True)
def a_browser():
    need_a_browser()


@pytest.fixture(scope="module")
def dissected(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    images = root / "images"
    images.mkdir()
    shutil.copy(BUS, images / "bus.jpg")
    code = ub.main(["--weights", "random", "--models", "yolo11n-detect", "--runs", "1", "--no-history",
                    "--images", str(images), "--output-dir", str(root)])
    assert code == 0
    row = load_report(root)["results"][0]
    return root, row


def test_the_page_loads_without_errors_and_shows_every_picture(dissected, tmp_path):
    root, row = dissected
    page = root / "viz" / row["viz_dir"].split("/viz/")[1] / "index.html"
    assert page.is_file()
    data = body_data(chromium("--dump-dom", page.as_uri()))
    assert "js-errors" not in data, data
    assert data["shown"] == str(row["total_layers_dissected"]) == "259"
    pictured = len(list(page.parent.glob("layer_*.png")))
    assert data["images"] == data["images-loaded"] == str(pictured)
    shot = tmp_path / "browser.png"  # kept out of the repository
    chromium("--window-size=1300,900", f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1300, 900)
    report = next((root / "results").glob("benchmark_report_*.md")).read_text(encoding="utf-8")
    assert "YOLO11nDetectBenchmark/index.html)" in report


def test_the_page_filters_by_module_or_type(dissected):
    root, row = dissected
    folder = root / "viz" / row["viz_dir"].split("/viz/")[1]
    layers = json.loads((folder / "layers_metadata.json").read_text(encoding="utf-8"))["layers"]
    for query in ("conv2d", "model.23"):
        expected = sum(query in l["name"].lower() or query in l["type"].lower() for l in layers)
        data = body_data(chromium("--dump-dom", (folder / "index.html").as_uri() + f"#filter={query}"))
        assert 0 < int(data["shown"]) == expected < 259, (query, data)


def test_the_page_sorts_by_parity_error(tmp_path):
    """A variant's page: the parity column, and sorting by it puts the worst output first
    (outputs without a reference figure last)."""
    errors = [3e-7, None, 0.2, 1e-3]
    meta = {"model_name": "M", "class_name": "M", "total_outputs": 4, "image": "bus.jpg",
            "layers": [{"index": i, "name": f"layer{i}", "type": "Conv2d", "call": 1, "shape": [1, 2],
                        "parity_rel_err": e, "files": []} for i, e in enumerate(errors)]}
    ub.write_layer_browser(tmp_path, meta)
    dom = chromium("--dump-dom", (tmp_path / "index.html").as_uri() + "#sort=parity")
    assert "js-errors" not in body_data(dom)
    assert "parity rel err" in dom
    assert re.findall(r"<td>(layer\d)</td>", dom) == ["layer2", "layer3", "layer0", "layer1"]
    assert re.findall(r"<td>(layer\d)</td>", chromium("--dump-dom", (tmp_path / "index.html").as_uri())) == \
        ["layer0", "layer1", "layer2", "layer3"]
