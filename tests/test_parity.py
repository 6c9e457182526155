"""Accuracy cost: pure rules on made-up outputs, then real models (random weights) against their
fp32 eager reference, with planted faults the checks must find."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import unified_benchmark as ub
from conftest import BUS, load_report, run_main

# -- the rules, on outputs made up here ------------------------------------------------------


def detections(boxes, scores, classes, **extra):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": np.asarray(scores, float),
            "classes": np.asarray(classes, float), **extra}


def test_detections_are_matched_by_class_and_iou():
    ref = detections([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [1, 2])
    same = ub.detection_parity(ref, ref, "detect")
    assert (same["precision"], same["recall"], same["f1"], same["box_iou_mean"], same["agreement"]) == (1, 1, 1, 1, 1)
    shifted = detections([[1, 0, 11, 10], [20, 20, 40, 40]], [0.7, 0.8], [1, 2])
    found = ub.detection_parity(shifted, ref, "detect")
    assert found["f1"] == 1 and found["box_iou_mean"] == pytest.approx((90 / 110 + 1) / 2)
    assert found["confidence_diff_max"] == pytest.approx(0.2)
    wrong_class = detections([[0, 0, 10, 10]], [0.9], [3])
    lost = ub.detection_parity(wrong_class, ref, "detect")
    assert (lost["precision"], lost["recall"], lost["f1"]) == (0, 0, 0)
    half = ub.detection_parity(detections([[0, 0, 10, 10]], [0.9], [1]), ref, "detect")
    assert (half["precision"], half["recall"]) == (1, 0.5) and half["f1"] == pytest.approx(2 / 3)
    far = ub.detection_parity(detections([[5, 5, 15, 15]], [0.9], [1]), detections([[0, 0, 10, 10]], [0.9], [1]), "detect")
    assert far["f1"] == 0  # IoU 25/175 < 0.5: no match
    none = ub.detection_parity(detections([], [], []), detections([], [], []), "detect")
    assert none == {"agreement": None, "note": "n/a (no detections)"}  # never a perfect 1.0
    gone = ub.detection_parity(detections([], [], []), ref, "detect")
    assert gone["agreement"] == 0


def test_segment_and_pose_figures_of_matched_instances():
    mask = np.zeros((2, 8, 8), bool)
    mask[0, :4, :4] = mask[1, 4:, 4:] = True
    ref = detections([[0, 0, 4, 4], [4, 4, 8, 8]], [0.9, 0.9], [0, 0], masks=mask,
                     keypoints=np.zeros((2, 17, 3)))
    half = mask.copy()
    half[0, :2, :4] = False
    var = dict(ref, masks=half, keypoints=np.concatenate([np.full((2, 17, 2), 3.0), np.ones((2, 17, 1))], axis=2))
    seg = ub.detection_parity(var, ref, "segment")
    assert seg["mask_iou_mean"] == pytest.approx(0.75) and seg["agreement"] == pytest.approx(0.75)
    pose = ub.detection_parity(var, ref, "pose")
    assert pose["keypoint_dist_px"] == pytest.approx(math.hypot(3, 3))
    assert pose["keypoint_dist_rel"] == pytest.approx(math.hypot(3, 3) / math.hypot(4, 4))
    assert pose["agreement"] == 1  # the boxes agree; the keypoints are reported beside


def test_depth_and_mask_figures():
    depth = np.linspace(1, 5, 100).reshape(10, 10)
    assert ub.depth_parity({"depth": depth}, {"depth": depth}) == {"abs_rel": 0, "delta_1_25": 1, "agreement": 1}
    farther = ub.depth_parity({"depth": depth * 1.3}, {"depth": depth})
    assert farther["abs_rel"] == pytest.approx(0.3) and farther["delta_1_25"] == 0
    fov = ub.depth_parity({"depth": depth, "fov_deg": 50.5}, {"depth": depth, "fov_deg": 50.0})
    assert fov["fov_diff_deg"] == pytest.approx(0.5)
    assert ub.depth_parity({"depth": depth}, {"depth": -depth})["agreement"] is None
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert ub.task_parity("mask", {"mask": a}, {"mask": a.T})["mask_iou"] == pytest.approx(1 / 3)
    assert ub.task_parity("mask", {"mask": a & False}, {"mask": a & False})["agreement"] is None


def test_verdicts_from_the_threshold_table():
    fp32, reduced = ub.PARITY_THRESHOLDS["fp32"], ub.PARITY_THRESHOLDS["reduced"]
    assert ub.parity_verdict("fp32", 0.0, False, 1.0, exact=True) == "exact"
    assert ub.parity_verdict("fp32", fp32["rel_l2"] / 2, False, None, False) == "ok"
    assert ub.parity_verdict("fp32", fp32["rel_l2"] * 2, False, None, False) == "drift"
    assert ub.parity_verdict("reduced", fp32["rel_l2"] * 2, False, None, False) == "ok"  # bf16 may do that
    assert ub.parity_verdict("reduced", reduced["rel_l2"] * 2, False, 0.95, False) == "drift"
    assert ub.parity_verdict("fp32", 0.0, False, 0.95, False) == "drift"  # agreement under 0.99
    assert ub.parity_verdict("reduced", 0.0, False, 0.4, False) == "broken"
    assert ub.parity_verdict("reduced", 0.0, True, 1.0, False) == "broken"
    assert ub.parity_verdict("fp32", math.inf, False, None, False) == "drift"
    assert ub.parity_threshold_set(ub.RunOptions(dtype="bf16", fuse=True)) == "reduced"
    assert ub.parity_threshold_set(ub.RunOptions(fuse=True)) == "fp32"
    assert not ub.changes_numerics(ub.RunOptions(threads=1))
    assert all(ub.changes_numerics(ub.RunOptions(**o)) for o in
               ({"dtype": "bf16"}, {"fuse": True}, {"channels_last": True}, {"compile": "default"}))


def test_tensor_figures_and_the_worst_image():
    ref = torch.tensor([3.0, 4.0])
    assert ub.tensor_parity(ref.clone(), ref)["exact"] is True
    off = ub.tensor_parity(torch.tensor([3.0, 4.5]), ref)
    assert off["max_abs"] == pytest.approx(0.5) and off["rel_l2"] == pytest.approx(0.1) and not off["exact"]
    assert ub.tensor_parity(torch.tensor([math.nan, 4.0]), ref)["nonfinite"] == 1
    assert ub.tensor_parity(torch.zeros(3), ref)["rel_l2"] == math.inf  # another shape
    images = [ub.image_parity("a", "mask", ([ref.clone()], {"mask": np.ones(2, bool)}), ([ref], {"mask": np.ones(2, bool)})),
              ub.image_parity("b", "mask", ([torch.tensor([3.0, 4.5])], {"mask": np.array([True, False])}),
                              ([ref], {"mask": np.ones(2, bool)}))]
    summary = ub.parity_summary("fp32", images)
    assert summary["parity_rel_l2_max"] == pytest.approx(0.1) and summary["parity_agreement"] == 0.5
    assert summary["parity"] == "drift" and summary["parity_task"]["mask_iou"] == 0.5


def test_a_fused_convolution_is_paired_with_the_unfused_batchnorm():
    ref = [("m.0.conv", 1, "Conv2d"), ("m.0.bn", 1, "BatchNorm2d"), ("m.0.act", 1, "SiLU"),
           ("m.1.c", 1, "Conv2d"), ("m.1.bn", 1, "BatchNorm2d"), ("m.2", 1, "Linear")]
    pairs = ub.parity_pairs(ref, {"m.0.conv", "m.0.act", "m.1.c", "m.2"})
    assert pairs[("m.0.conv", 1)] == (("m.0.bn", 1), ("m.0.conv", 1), "fused: against the unfused m.0.bn")
    assert pairs[("m.1.c", 1)][0] == ("m.1.bn", 1)
    assert pairs[("m.0.act", 1)] == (("m.0.act", 1), ("m.0.act", 1), None)
    assert ub.parity_pairs(ref, {n for n, _, _ in ref})[("m.0.conv", 1)][0] == ("m.0.conv", 1)  # unfused


def test_a_worse_parity_verdict_is_a_change_since_earlier_runs():
    row = {"model_name": "M", "class_name": "M", "runs": [], "parity": "drift", "parity_rel_l2_max": 2e-3}
    before = {**row, "parity": "ok", "parity_rel_l2_max": 1e-6, "environment": {"torch": "2.4"}, "verdicts": {}}
    changed = [v for v in ub.judge_model(row, [before], {"torch": "2.5"}) if v["metric"] == "accuracy"]
    assert len(changed) == 1 and changed[0]["verdict"] == "parity changed" and changed[0]["detail"] == "ok -> drift"
    assert changed[0]["env_changes"] == ["torch 2.4 -> 2.5"]
    assert not [v for v in ub.judge_model({**row, "parity": "ok"}, [{**before, "parity": "drift"}], {})
                if v["metric"] == "accuracy"]


# -- real models, random weights -----------------------------------------------------------


def loaded(cls, **options):
    bench = cls(torch.device("cpu"), "random", options=ub.RunOptions(**options))
    bench.load()
    return bench


def bus():
    return [("bus.jpg", ub.decode_image(BUS))]


def test_fused_yolo_is_ok_and_each_fused_conv_is_compared_with_its_batchnorm():
    found = ub.check_parity(loaded(ub.YOLO11nDetectBenchmark, fuse=True), bus(), layers=True)
    assert found["parity"] == "ok" and found["parity_thresholds"] == "fp32"
    assert 0 < found["parity_rel_l2_max"] <= ub.PARITY_THRESHOLDS["fp32"]["rel_l2"]
    assert found["parity_nonfinite"] is False and found["reference_sec"] > 0
    # Random weights give no box above the confidence threshold: n/a, never a perfect agreement.
    assert found["parity_agreement"] is None and found["parity_note"] == "n/a (no detections)"
    fused = [layer for layer in found["parity_layers"] if (layer["note"] or "").startswith("fused")]
    assert len(fused) > 50 and all(layer["rel_err"] < 1e-4 for layer in fused)
    assert found["parity_first_drift"] is None and len(found["parity_growth_top"]) == 5
    assert found["parity_layers_compared"] == len(found["parity_layers"])


def test_a_planted_fault_in_one_layer_is_the_first_drifting_layer():
    variant = loaded(ub.YOLO11nDetectBenchmark, channels_last=True)
    target = "model.4.cv1.conv"
    module = dict(variant.model.named_modules())[target]
    module.register_forward_hook(lambda m, i, out: out * 1.05)  # the variant's only
    found = ub.check_parity(variant, bus(), layers=True)
    drift = found["parity_first_drift"]
    assert (drift["name"], drift["call"]) == (target, 1) and drift["rel_err"] == pytest.approx(0.05, rel=0.01)
    earlier = found["parity_layers"][:[layer["name"] for layer in found["parity_layers"]].index(target)]
    assert earlier and all(layer["rel_err"] < 1e-5 for layer in earlier)
    assert found["parity_growth_top"][0]["name"] == target
    assert found["parity"] == "drift"


def test_a_planted_nan_is_broken():
    variant = loaded(ub.YOLO11nDetectBenchmark, channels_last=True)
    module = dict(variant.model.named_modules())["model.9.cv2.conv"]
    module.register_forward_hook(lambda m, i, out: out.index_fill(1, torch.tensor([0]), math.nan))
    found = ub.check_parity(variant, bus(), layers=False)
    assert found["parity"] == "broken" and found["parity_nonfinite"] is True
    assert "parity_layers" not in found


def test_a_no_op_option_is_exact_which_proves_the_reference_has_the_variants_weights():
    """DA-V2 has no Conv+BN pair: --fuse runs it as loaded, so its outputs must be bitwise the reference's."""
    found = ub.check_parity(loaded(ub.DepthAnythingV2SmallBenchmark, fuse=True), bus(), layers=False)
    assert found["parity"] == "exact" and found["parity_rel_l2_max"] == 0
    assert found["parity_task"] == {"abs_rel": 0, "delta_1_25": 1, "agreement": 1}


@pytest.mark.slow  # the shared eight-model run
def test_every_row_of_a_plain_run_is_the_reference(eight_models):
    code, text, report = eight_models
    assert code == 0, text
    assert {r["parity"] for r in report["results"]} == {"reference"}
    assert "[PARITY]" not in text  # no reference instance was built


def test_bf16_yolo_run_reports_the_accuracy_cost_everywhere(tmp_path, one_image_dir, capsys):
    code, out = run_main(capsys, "--weights", "random", "--models", "yolo11n-pose", "--runs", "2", "--no-dissect",
                         "--parity-layers", "--dtype", "bf16", "--images", one_image_dir, "--output-dir", tmp_path)
    assert code == 0, out
    row = load_report(tmp_path)["results"][0]
    assert row["parity"] in ("ok", "drift") and row["parity_thresholds"] == "reduced"
    assert 1e-3 < row["parity_rel_l2_max"] < 0.5 and row["parity_max_abs"] > 0 and row["reference_sec"] > 0
    assert len(row["runs"]) == 2  # the reference's forwards are not samples
    assert row["parity_layers_compared"] > 200 and "parity_layers" not in row
    assert "[PARITY] Accuracy cost against fp32 eager (reduced thresholds)" in out
    md = next((tmp_path / "results").glob("benchmark_report_*.md")).read_text(encoding="utf-8")
    block = md.split("## Accuracy cost")[1].split("\n## ")[0]
    assert f"| YOLO11n-Pose | {row['parity']} (reduced thresholds) | {row['parity_rel_l2_max']:.2e} |" in block
    assert "n/a (no detections)" in block and "Where the error of YOLO11n-Pose grows most" in block
    csv_text = next((tmp_path / "results").glob("benchmark_summary_*.csv")).read_text(encoding="utf-8")
    assert "parity_rel_l2_max" in csv_text.splitlines()[0]
