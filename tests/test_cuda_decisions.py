"""The CUDA path's decisions, tested on the CPU: no test here can run a CUDA call, so every choice
the CUDA section makes (device index, Ray device strings, NVML device, other GPU processes, FLOP
classes and peaks, compile warm-up, energy window order, layer timing) is a pure function checked
against the answer a GPU would need."""

import time

import pytest
import torch
import torch.nn.functional as F
from torch.cuda._utils import _get_device_index

from conftest import run_main, ub

# -- device index ------------------------------------------------------------------------------


@pytest.mark.parametrize("request_, count, current, expected", [
    ("auto", 1, 0, "cuda:0"), ("cuda", 1, 0, "cuda:0"), ("auto", 4, 2, "cuda:2"), ("cuda", 4, 3, "cuda:3"),
    ("cuda:1", 2, 0, "cuda:1"), ("cpu", 2, 0, "cpu"),
])
def test_every_cuda_device_is_indexed(request_, count, current, expected):
    device = ub.pick_cuda_device(request_, True, count, current)
    assert str(device) == expected
    if device.type == "cuda":  # what torch.cuda.set_device does with it first: no ValueError
        assert _get_device_index(device) == device.index


def test_the_unindexed_device_is_what_set_device_refuses():
    """The bug this guards against: torch.device('cuda') has no index and set_device raises."""
    with pytest.raises(ValueError, match="specified index"):
        _get_device_index(torch.device("cuda"))


def test_cuda_requests_without_cuda_and_beyond_the_count_are_usage_errors():
    assert ub.pick_cuda_device("auto", False, 0, 0) == torch.device("cpu")
    for request in ("cuda", "cuda:0"):
        with pytest.raises(ub.UsageError, match="CUDA is not available"):
            ub.pick_cuda_device(request, False, 0, 0)
    with pytest.raises(ub.UsageError, match=r"only 2 CUDA device\(s\) present"):
        ub.pick_cuda_device("cuda:2", True, 2, 0)


def test_this_machine_resolves_auto_to_the_cpu_and_sets_up_no_cuda():
    assert ub.resolve_device("auto") == torch.device("cpu")
    assert not torch.cuda.is_initialized()


# -- Ray -----------------------------------------------------------------------------------------


def test_ray_nodes_resolve_cuda_themselves_and_cuda_n_is_refused():
    assert ub.ray_device_request("cuda") == "cuda" and ub.ray_device_request("auto") == "auto"
    assert ub.resolve_device("cuda", on_ray=True) == torch.device("cuda")  # resolved on the node
    with pytest.raises(ub.UsageError, match="CUDA_VISIBLE_DEVICES"):
        ub.ray_device_request("cuda:1")


def test_cuda_n_with_ray_exits_2_before_any_cluster(tmp_path, one_image_dir, capsys):
    code, out = run_main(capsys, "--executor", "ray", "--device", "cuda:1", "--weights", "random", "--models",
                         "yolo11n-detect", "--images", str(one_image_dir), "--output-dir", str(tmp_path))
    assert code == ub.EXIT_USAGE and "Use --device cuda" in out, out


def test_every_ray_task_takes_the_nodes_one_slot():
    """One model at a time per node in every fleet mode: a GPU task also takes the node's slot."""
    assert ub.ray_task_resources(True) == {"num_cpus": 0, "resources": {ub.RAY_SLOT: 1}, "num_gpus": 1}
    assert ub.ray_task_resources(False) == {"num_cpus": 0, "resources": {ub.RAY_SLOT: 1}}


def test_nodes_without_a_slot_or_without_a_gpu_are_left_out_saying_why():
    nodes = [{"NodeID": "a" * 20, "Alive": True, "NodeManagerHostname": "gpu1", "Resources": {"GPU": 8.0, ub.RAY_SLOT: 1}},
             {"NodeID": "b" * 20, "Alive": True, "NodeManagerHostname": "gpu2", "Resources": {"GPU": 8.0}},
             {"NodeID": "c" * 20, "Alive": True, "NodeManagerHostname": "cpu1", "Resources": {ub.RAY_SLOT: 1}},
             {"NodeID": "d" * 20, "Alive": False, "NodeManagerHostname": "gone", "Resources": {ub.RAY_SLOT: 1}}]
    usable, excluded = ub.eligible_nodes(nodes, use_gpu=True)
    assert [n["NodeManagerHostname"] for n in usable] == ["gpu1"]
    assert len(excluded) == 2 and ub.RAY_SLOT in excluded[0] and "no GPU" in excluded[1]
    usable, excluded = ub.eligible_nodes(nodes, use_gpu=False)
    assert [n["NodeManagerHostname"] for n in usable] == ["gpu1", "cpu1"]


# -- NVML ----------------------------------------------------------------------------------------

NVML_UUIDS = ["GPU-1f2e3d4c-0000-1111-2222-333344445555", "GPU-a0b1c2d3-6666-7777-8888-999900001111"]


def test_the_nvml_device_is_found_by_uuid_not_by_cuda_index():
    """Under Ray the task's cuda:0 is physical GPU 1: NVML must read GPU 1."""
    assert ub.nvml_index_for("a0b1c2d3-6666-7777-8888-999900001111", NVML_UUIDS) == 1
    assert ub.nvml_index_for("GPU-A0B1C2D3-6666-7777-8888-999900001111", NVML_UUIDS) == 1
    assert ub.nvml_index_for("1f2e3d4c-0000-1111-2222-333344445555", NVML_UUIDS) == 0
    assert ub.nvml_index_for("MIG-deadbeef-0000-0000-0000-000000000000", NVML_UUIDS) is None


def test_our_own_gpu_process_is_told_apart():
    assert ub.other_gpu_processes([(10, 900.0), (11, 500.0)], 10, 400.0) == ([11], "pid")
    # In a container NVML's PIDs are the host's: ours is the one holding our reserved memory + a context.
    others, how = ub.other_gpu_processes([(4711, 3000.0), (4712, 900.0)], 10, 2500.0)
    assert others == [4712] and how.startswith("memory match")
    assert ub.other_gpu_processes([(4711, 3000.0)], 10, 2500.0) == ([], "only process on the GPU")
    others, how = ub.other_gpu_processes([(4711, 90000.0), (4712, 100.0)], 10, 2500.0)
    assert others == [4711, 4712] and how.startswith("undecided")



def test_a_runtime_rows_gpu_memory_is_nvmls_figure_for_our_process():
    """The torch allocator does not see ONNX Runtime's memory: a runtime row on CUDA reports NVML's
    figure for this process, found as other_gpu_processes finds it, or none when undecided."""
    assert [ub.memory_kind(*k) for k in (("cpu", "torch"), ("cpu", "onnxruntime"), ("cuda", "torch"),
                                         ("cuda", "onnxruntime"), ("cuda", "tensorrt"))] == [
        "process_rss", "process_rss", "cuda_allocated", "gpu_process_nvml", "gpu_process_nvml"]
    assert ub.own_gpu_process_mb([(10, 900.0), (11, 500.0)], 10) == 900.0  # by PID
    assert ub.own_gpu_process_mb([(4711, 3000.0)], 10) == 3000.0  # the only process
    # Two processes with PIDs of another namespace: undecided. A memory match against torch's
    # reserved 40 MB (other_gpu_processes' way) would take the other, small process for ours.
    assert ub.other_gpu_processes([(4711, 9000.0), (4712, 900.0)], 10, 40.0)[0] == [4711]
    assert ub.own_gpu_process_mb([(4711, 9000.0), (4712, 900.0)], 10) is None
    assert ub.own_gpu_process_mb([(10, None)], 10) is None  # NVML gave no figure
    snap = {"rss_mb": 1.0, "cuda_allocated_mb": 2.0, "cuda_reserved_mb": 3.0, "gpu_process_mb": 4.0}
    assert [ub.headline_mb(snap, k) for k in ("process_rss", "cuda_allocated", "gpu_process_nvml")] == [1.0, 2.0, 4.0]
    assert ub.mb_delta(snap, {**snap, "gpu_process_mb": None}, "gpu_process_nvml") is None
    assert ub.mb_delta(snap, {**snap, "rss_mb": 0.25}, "process_rss") == 0.75


def test_cuda_events_time_torch_rows_only():
    """A runtime runs on streams of its own: events on torch's stream would time nothing of it."""
    assert ub.cuda_events_time("cuda", "torch")
    assert not any(ub.cuda_events_time(d, b) for d, b in (("cuda", "onnxruntime"), ("cuda", "tensorrt"), ("cpu", "torch")))


# -- FLOP classes, peaks and MFU -------------------------------------------------------------------

@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA L40", "fp32", 90.5), ("NVIDIA L40S", "fp32", 91.6), ("NVIDIA L4", "fp32", 30.3),
    ("NVIDIA H100 NVL", "bf16", 835.5), ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H200", "tf32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA H100 PCIe", "fp32", 51.2),
    ("NVIDIA H100 MIG 1g.10gb", "bf16", None), ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "fp32", None),
])
def test_the_peak_table_matches_whole_model_names(name, precision, peak):
    assert ub.peak_tflops_for(name, precision) == peak


def test_flops_are_split_into_convolutions_and_matrix_products():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(1, 3, 8, 8)
    total, _, by_class = ub.count_flops(lambda: model(x), ub.leaf_modules(model))
    assert by_class == {"conv": 2 * 6 * 6 * 8 * 3 * 3 * 3, "matmul": 2 * 8 * 6 * 6 * 4}
    assert total == sum(by_class.values())
    q = torch.randn(1, 2, 16, 8)
    assert ub.count_flops(lambda: F.scaled_dot_product_attention(q, q, q), [])[2]["matmul"] > 0


def test_fp32_convolutions_use_the_tf32_peak_when_cudnn_allows_it():
    """cuDNN's TF32 flag is on by default and cuBLAS's off: a conv-heavy fp32 model divided by the
    plain fp32 peak would show an MFU up to ~7x too high."""
    flags = {"conv": True, "matmul": False}
    assert ub.class_precisions("cuda", "fp32", flags) == {"conv": "tf32", "matmul": "fp32"}
    assert ub.class_precisions("cuda", "bf16", flags) == {"conv": "bf16", "matmul": "bf16"}
    assert ub.class_precisions("cpu", "fp32", flags) == {"conv": "fp32", "matmul": "fp32"}
    mix = {"conv": 9 * 10**9, "matmul": 1 * 10**9}
    peak = ub.mix_peak_tflops(mix, {"conv": 494.7, "matmul": 66.9})
    assert peak == pytest.approx(10 / (9 / 494.7 + 1 / 66.9))
    assert 66.9 < peak < 494.7
    assert ub.mix_peak_tflops({"conv": 10, "matmul": 0}, {"conv": 494.7, "matmul": None}) == pytest.approx(494.7)
    assert ub.mix_peak_tflops(mix, {"conv": 494.7, "matmul": None}) is None


def test_tf32_flags_are_read_through_either_torch_api(monkeypatch):
    """torch >= 2.9 keeps TF32 in fp32_precision; reading allow_tf32 raises once the APIs mix."""
    assert ub.cuda_tf32_flags() == {"conv": True, "matmul": False}  # torch's defaults
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")
    try:
        assert ub.cuda_tf32_flags()["matmul"] is True
    finally:
        monkeypatch.undo()
    assert ub.class_precisions("cuda", "fp32", {"conv": None, "matmul": False}) == {"conv": None, "matmul": "fp32"}
    assert ub.peak_tflops_for("NVIDIA H200", None) is None  # unknown precision: no MFU, never a guess


def test_cpu_rows_record_the_flop_split_and_no_peak():
    figures = ub.compute_figures(10**9, {"conv": 6 * 10**8, "matmul": 4 * 10**8}, 0.01, torch.device("cpu"), "fp32")
    assert figures["flops_by_class"] == {"conv": 6 * 10**8, "matmul": 4 * 10**8}
    assert figures["peak_tflops"] is None and figures["mfu"] is None and set(figures["tf32"]) == {"conv", "matmul"}


# -- compile warm-up, layer timing, energy ----------------------------------------------------------

def test_cuda_graph_modes_warm_up_until_they_replay():
    assert ub.compile_warmup_calls("reduce-overhead", "cuda") == 2
    assert ub.compile_warmup_calls("max-autotune", "cuda") == 2
    assert ub.compile_warmup_calls("default", "cuda") == 1
    assert ub.compile_warmup_calls("reduce-overhead", "cpu") == 1  # no CUDA graphs on the CPU
    assert ub.compile_warmup_calls(None, "cuda") == 0


def test_no_clock_before_runtime_init_synchronises_cuda():
    """A synchronise creates the CUDA context: the import phase's clocks and runtime init's start
    clock must not, so the context's creation is inside runtime_init_sec (which ends synchronised)."""
    cuda = torch.device("cuda", 0)
    assert ub.phase_clock_device("import", cuda) == torch.device("cpu")
    assert ub.phase_clock_device("runtime init", cuda) == torch.device("cpu")
    assert ub.phase_clock_device("load", cuda) == cuda and ub.phase_clock_device("compile", cuda) == cuda


def test_layers_are_timed_in_a_pass_of_their_own_on_cuda():
    assert ub.layer_timing_pass("cuda") == "separate pass"
    assert ub.layer_timing_pass("cpu") == "capture pass"


def test_the_separate_timing_pass_times_every_call_and_captures_once(tmp_path):
    """The CUDA code path, run here with host clocks: one capture forward, one timing forward."""
    shared = torch.nn.ReLU()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), shared, torch.nn.Conv2d(4, 4, 3), shared)
    forwards = []
    x = torch.randn(1, 3, 16, 16)

    def forward():
        forwards.append(1)
        return model(x)

    dissector = ub.LayerDissector(model, tmp_path, [], verbose=False, timing="separate pass")
    summary = dissector.run(forward)
    assert len(forwards) == 2 and summary["layer_timing"] == "separate pass"
    assert summary["total_outputs"] == 4
    assert all(layer["forward_ms"] is not None and layer["forward_ms"] >= 0 for layer in summary["layers"])
    assert [(l["name"], l["call"]) for l in summary["layers"]] == [("0", 1), ("1", 1), ("2", 1), ("1", 2)]


class ScriptedEnergyCounter:
    """NVML's energy counter stand-in that logs when it is read: each read adds 1 mJ, each run 10 mJ."""

    def __init__(self, log):
        self.log, self.mj = log, 0

    def energy_mj(self):
        self.log.append("read")
        self.mj += 1
        return self.mj


def test_the_idle_window_comes_first_after_a_settle(monkeypatch):
    monkeypatch.setattr(ub, "ENERGY_WINDOW_SEC", 0.05)
    log = []
    counter = ScriptedEnergyCounter(log)

    def run_once():
        log.append("run")
        counter.mj += 10

    def sleep(seconds):
        log.append("sleep")
        time.sleep(0.05)

    figures = ub.energy_per_inference(counter, run_once, torch.device("cpu"), sleep=sleep)
    first_run = log.index("run")
    assert log[:first_run] == ["read", "sleep", "read", "sleep", "read", "read"]
    assert figures["energy_runs"] == log.count("run") > 0
    assert figures["power_mean_w"] > figures["power_idle_w"] >= 0


def test_compile_warm_up_goes_on_while_a_call_still_compiles():
    settled = ub.compile_settled
    assert not settled(0, 1, True) and not settled(1, 1, True) and settled(2, 1, False)  # a recompile, then quiet
    assert settled(1, 1, False)                    # compiled once, nothing more
    assert not settled(1, 2, False) and settled(2, 2, False)  # CUDA graphs: the recording call first
    assert settled(1 + ub.COMPILE_SETTLE_MAX_EXTRA_CALLS, 1, True)  # never forever
