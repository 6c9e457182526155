"""Durable progress: every finished model is in an fsync'd journal before the next one starts,
and a run that dies (SIGKILL of the main process) is recovered by the next run in its folder."""

import json
import os
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
from conftest import read_until, run_main, start_cli, ub


def entry(**fields) -> bytes:
    return ub.journal_line({"wall_time": 1.0, **fields})


def test_a_torn_or_corrupt_line_is_ignored_and_counted():
    whole = entry(event="start", config={}) + entry(event="finished", row={"class_name": "A"})
    corrupt = bytearray(entry(event="finished", row={"class_name": "B"}))
    corrupt[20] ^= 0x01  # one flipped bit: the CRC no longer matches
    torn = entry(event="finished", row={"class_name": "C"})[:-9]  # cut short: no newline
    entries, torn_lines = ub.parse_journal(whole + bytes(corrupt) + torn)
    assert [e.get("row", {}).get("class_name") for e in entries] == [None, "A"]
    assert torn_lines == 2
    # A whole line that merely lacks its newline is still torn: the write did not finish.
    entries, torn_lines = ub.parse_journal(whole + entry(event="started", class_name="D").rstrip(b"\n"))
    assert len(entries) == 2 and torn_lines == 1


def test_the_journal_is_fsynced_per_entry_and_reads_back(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(ub.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    journal = ub.RunJournal(tmp_path / "journal_x.jsonl", {"config": {"models": ["A", "B", "C"]}})
    assert not (tmp_path / "journal_x.jsonl").exists()  # nothing before the first model: a usage error leaves none
    for call in (lambda: journal.started("A", "torch"), lambda: journal.finished({"class_name": "A", "status": "ok"}),
                 lambda: journal.started("B", "torch")):
        before = len(synced)
        call()
        assert len(synced) > before  # every entry on disk before the call returns
    dead = ub.read_journal(tmp_path / "journal_x.jsonl")
    assert [r["class_name"] for r in dead["rows"]] == ["A"] and dead["started"] == ["A", "B"]
    assert ub.lost_models(["A", "B", "C"], dead["started"], dead["rows"]) == [
        "B (running when the run died)", "C (not started)"]
    journal.discard()
    assert not (tmp_path / "journal_x.jsonl").exists()


def test_every_node_runs_of_one_class_are_told_apart_by_node():
    """--fleet every-node runs a class once per node: a row from one node does not make the other
    node's run of it finished."""
    started = [ub.run_key("A", node_label="M1"), ub.run_key("A", node_label="M2"), ub.run_key("B", node_label="M1")]
    rows = [{"class_name": "A", "node_label": "M2"}, {"class_name": "C", "node_label": "M1"}]  # C: a skipped row
    assert ub.lost_models(["A", "B", "C", "D"], started, rows) == [
        "A @ M1 (running when the run died)", "B @ M1 (running when the run died)", "D (not started)"]


def test_rows_of_one_model_on_several_backends_are_told_apart():
    """--backend torch,onnxruntime: a model's torch row does not make its onnxruntime row finished;
    a row from before backends (no runtime field) is the torch row."""
    started = [ub.run_key("A", "torch"), ub.run_key("A", "onnxruntime")]
    rows = [{"class_name": "A"}]
    planned = [ub.run_key(c, b) for c in "AB" for b in ("torch", "onnxruntime")]
    assert planned == ["A", "A:onnxruntime", "B", "B:onnxruntime"]
    assert ub.lost_models(planned, started, rows) == [
        "A:onnxruntime (running when the run died)", "B (not started)", "B:onnxruntime (not started)"]
    assert ub.row_key({"class_name": "A", "runtime": "openvino", "node_label": "M1"}) == "A:openvino @ M1"


def test_a_journal_that_cannot_be_created_is_a_warning_and_leaves_nothing(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        journal = ub.RunJournal(folder / "journal_x.jsonl", {"config": {}})
        journal.finished({"class_name": "A"})  # no exception: the run goes on
    finally:
        folder.chmod(0o700)
    if os.geteuid() != 0:  # root writes anyway; then the file is whole and readable
        assert "could not be written" in capsys.readouterr().out
        assert list(folder.iterdir()) == []


def test_the_run_configuration_round_trips_through_the_journal(tmp_path):
    cfg = ub.RunConfig(models=ub.resolve_models("yolo11n-detect,mobilesam"), images=[tmp_path / "a.jpg"],
                       image_source=str(tmp_path), runs=3, device=ub.torch.device("cpu"), weights="random",
                       models_dir=tmp_path / "models", output_dir=tmp_path, dissect=True, dissect_mode="single-pass",
                       keep_going=True, timestamp="20260101_000000", options=ub.RunOptions(dtype="bf16", threads=2),
                       skips={"X": "why"}, work_dir=tmp_path / "work")
    record = json.loads(json.dumps(cfg.record()))
    back = ub.RunConfig.from_record(record)
    assert back.models == cfg.models and back.images == cfg.images and back.options == cfg.options
    assert back.device == cfg.device and back.run_id == cfg.run_id and back.skips == cfg.skips
    assert back.work_dir is None and "journal" not in record


def dead_run(tmp_path, one_image_dir) -> Path:
    """Three models; the main process is SIGKILLed while model 2 runs. Returns the output folder."""
    out = tmp_path / "out"
    proc = start_cli("--weights", "random", "--models", "yolo11n-detect,yolo11n-pose,yolo11n-seg", "--runs", "4",
                     "--no-dissect", "--images", one_image_dir, "--output-dir", out)
    lines: list[str] = []
    try:
        read_until(proc, r"YOLO11nDetectBenchmark finished", lines, timeout=300)
        worker = int(read_until(proc, r"Worker process (\d+) started for YOLO11nPoseBenchmark", lines).group(1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 30  # the worker dies with its parent
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{worker}").exists(), "".join(lines)
    return out


@pytest.mark.slow
def test_sigkill_during_model_2_loses_nothing_finished(tmp_path, one_image_dir, capsys):
    out = dead_run(tmp_path, one_image_dir)
    results = out / "results"
    (left,) = Path(tempfile.gettempdir()).glob(ub.work_folder_prefix(out.resolve()) + "*")  # nothing removed it
    (journal,) = results.glob("journal_*.jsonl")
    stamp = journal.stem.removeprefix("journal_")
    assert not list(results.glob("benchmark_results_*.json"))
    with open(journal, "ab") as f:  # the power went while a line was being written
        f.write(entry(event="finished", row={"class_name": "YOLO11nPoseBenchmark"})[:40])

    # The next run in the folder (same configuration for model 1) recovers the dead one first.
    code, text = run_main(capsys, "--weights", "random", "--models", "yolo11n-detect", "--runs", "4", "--no-dissect",
                          "--images", one_image_dir, "--output-dir", out)
    assert code == 0, text
    assert f"Run {stamp} died before writing its reports" in text and "1 torn line(s) ignored" in text
    assert f"Removed {left}, the work folder of an earlier run" in text and not left.exists()
    assert not list(Path(tempfile.gettempdir()).glob(ub.work_folder_prefix(out.resolve()) + "*"))
    assert not list(results.glob("journal_*.jsonl"))
    dead = json.loads((results / f"benchmark_results_{stamp}.json").read_text())
    assert dead["complete"] is False and dead["timestamp"] == stamp
    assert [r["class_name"] for r in dead["results"]] == ["YOLO11nDetectBenchmark"]
    assert dead["results"][0]["status"] == "ok" and len(dead["results"][0]["runs"]) == 4
    assert dead["recovered"]["lost"] == ["YOLO11nPoseBenchmark (running when the run died)",
                                         "YOLO11nSegmentBenchmark (not started)"]
    assert dead["recovered"]["torn_lines"] == 1
    md = (results / f"benchmark_report_{stamp}.md").read_text()
    assert "INCOMPLETE RUN" in md and "Lost: YOLO11nPoseBenchmark (running when the run died)" in md

    db = sqlite3.connect(results / "history.sqlite")
    runs = dict(db.execute("SELECT run_id, complete FROM runs").fetchall())
    assert runs[dead["run_id"]] == 0 and len(runs) == 2
    keys = {r[0] for r in db.execute("SELECT config_key FROM model_results WHERE class_name='YOLO11nDetectBenchmark'")}
    assert len(keys) == 1  # the same configuration: only its being incomplete keeps it out of the baseline
    latest = sorted(results.glob("benchmark_results_*.json"))[-1]
    new = json.loads(latest.read_text())
    assert new["run_id"] != dead["run_id"]
    warm = next(v for v in new["verdicts"] if v["metric"] == "warm latency")
    assert warm["baseline_runs"] == 0
    store = ub.HistoryStore(results / "history.sqlite")
    try:
        later = {**new, "started_at": "2999-01-01T00:00:00"}
        assert [e["run_id"] for e in store.earlier(later, new["results"][0])] == [new["run_id"]]
    finally:
        store.close()


def journal_of(tmp_path, one_image_dir, history: bool = True):
    """A run's configuration and a journal for it, as run() makes them."""
    cfg = ub.RunConfig(models=ub.resolve_models("dav2-small,yolo11n-detect"),
                       images=[one_image_dir / "bus.jpg"], image_source=str(one_image_dir), runs=2,
                       device=ub.torch.device("cpu"), weights="random", models_dir=tmp_path, output_dir=tmp_path,
                       dissect=False, dissect_mode="single-pass", keep_going=False, timestamp="20260101_000000",
                       started_at="2026-01-01T00:00:00",
                       history=str(tmp_path / "results" / "history.sqlite") if history else None)
    (tmp_path / "results").mkdir(exist_ok=True)
    journal = ub.RunJournal(tmp_path / "results" / "journal_20260101_000000.jsonl",
                            {"config": cfg.record(), "environment": ub.environment(cfg.device),
                             "image_set": ub.image_fingerprints(cfg.images)})
    return cfg, journal


def test_a_run_whose_reports_failed_is_recovered_with_its_own_outcome(tmp_path, one_image_dir, capsys):
    """It did not die: its 'ended' entry says how it ended, and the recovered run is complete."""
    cfg, journal = journal_of(tmp_path, one_image_dir)
    skipped = ub.status_row(cfg.models[0], "skipped", "weights missing")
    journal.finished(skipped)
    journal.ended(True, ub.EXIT_OK, None)
    journal.close()
    code, text = run_main(capsys, "--recover", "--output-dir", tmp_path)
    assert code == 0 and "failed to write its reports" in text, text
    report = json.loads((tmp_path / "results" / "benchmark_results_20260101_000000.json").read_text())
    assert report["complete"] is True and report["recovered"]["how"] == "failed to write its reports"


def test_recover_option_writes_a_dead_runs_reports(tmp_path, one_image_dir, capsys):
    """--recover on a journal left by a run that died after a skipped model and during the next,
    in a folder moved since (the history inside it follows)."""
    original, moved = tmp_path / "night", tmp_path / "moved"
    original.mkdir()
    cfg, journal = journal_of(original, one_image_dir)
    skipped = ub.status_row(cfg.models[0], "skipped", "weights missing")
    journal.finished(skipped)
    journal.started(cfg.models[1].__name__, "torch")
    journal.close()  # the process dies here: nothing else is written
    saved = journal.path.read_bytes()
    original.rename(moved)
    code, text = run_main(capsys, "--recover", "--output-dir", moved)
    assert code == 0, text
    tmp_path = moved
    report = json.loads((tmp_path / "results" / "benchmark_results_20260101_000000.json").read_text())
    assert report["complete"] is False and report["run_id"] == cfg.run_id
    assert [(r["class_name"], r["status"]) for r in report["results"]] == [(skipped["class_name"], "skipped")]
    assert report["recovered"]["lost"] == ["YOLO11nDetectBenchmark (running when the run died)"]
    db = sqlite3.connect(tmp_path / "results" / "history.sqlite")
    assert db.execute("SELECT complete, source FROM runs").fetchall() == [(0, "recovered")]
    code, text = run_main(capsys, "--recover", "--output-dir", tmp_path)
    assert code == 0 and "Nothing to recover" in text
    # Died after its JSON report (written last) but before its history entry: the history gets it.
    (tmp_path / "results" / "journal_20260101_000000.jsonl").write_bytes(saved)
    (tmp_path / "results" / "history.sqlite").unlink()
    code, text = run_main(capsys, "--recover", "--output-dir", tmp_path)
    assert code == 0 and "left as they are" in text
    db = sqlite3.connect(tmp_path / "results" / "history.sqlite")
    assert db.execute("SELECT run_id, complete FROM runs").fetchall() == [(cfg.run_id, 0)]
    assert not list((tmp_path / "results").glob("journal_*"))


@pytest.mark.parametrize("text", [b"", b"garbage\n", entry(event="start", config={"models": ["Nope"]})])
def test_a_journal_that_cannot_be_recovered_is_named_and_moved_aside(tmp_path, capsys, text):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "journal_20260101_000000.jsonl").write_bytes(text)
    code, out = run_main(capsys, "--recover", "--output-dir", tmp_path)
    assert code == 1 and "could not be recovered" in out and "Traceback" not in out
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["journal_20260101_000000.jsonl.unrecoverable"]
    code, out = run_main(capsys, "--recover", "--output-dir", tmp_path)  # later runs are not troubled by it
    assert code == 0 and "Nothing to recover" in out
