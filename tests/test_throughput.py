"""Throughput protocol, telemetry and environment records on real (tiny, random-init) timm ViTs.

CPU tests use short windows so the file stays fast; the GPU tests run only where CUDA is available.
"""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from tpsexplore.backbones import create_backbone
from tpsexplore.measure.environment import environment_info
from tpsexplore.measure.telemetry import Telemetry, decode_throttle_reasons, read_telemetry
from tpsexplore.measure.throughput import (
    PairResult,
    Speedup,
    ThroughputConfig,
    ThroughputResult,
    measure_pair,
    measure_throughput,
    resolve_device,
)

FAST = dict(warmup_iters=2, warmup_s=0.05, window_s=0.05, windows=3, progress=False)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_vit(depth: int = 2, img_size: int = 32):
    return create_backbone("deit_t", weights="random", img_size=img_size, patch_size=8, num_classes=10,
                           depth=depth, embed_dim=64, num_heads=2)


class CallLog:
    """Forward hook that records the conditions each forward of the model ran under."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls.append({"training": module.training, "inference": torch.is_inference_mode_enabled(),
                           "autocast": torch.is_autocast_enabled("cpu"), "out_dtype": output.dtype,
                           "batch": args[0].shape[0], "device": args[0].device.type})


def test_cpu_results_well_formed():
    model = tiny_vit()
    model.train()
    log = CallLog(model)
    cfg = ThroughputConfig(batch_sizes=(1, 4), dtypes=("fp32",), device="cpu", **FAST)
    results = measure_throughput(model, cfg, label="tiny")
    assert [(r.batch_size, r.requested_batch_size, r.dtype) for r in results] == [(1, 1, "fp32"), (4, 4, "fp32")]
    for r in results:
        assert r.status == "ok" and r.ok and r.error is None
        assert r.label == "tiny" and r.device == "cpu" and r.timer == "perf_counter" and not r.autocast
        assert r.input_shape == [r.batch_size, 3, 32, 32]
        assert r.windows == 3 == len(r.window_iters) == len(r.window_seconds) == len(r.window_images_per_s)
        assert all(s >= cfg.window_s for s in r.window_seconds)  # every window is at least window_s long
        for n, s, ips in zip(r.window_iters, r.window_seconds, r.window_images_per_s):
            assert n >= 1 and ips == pytest.approx(n * r.batch_size / s)
        assert 0 < r.images_per_s_min <= r.images_per_s_q1 <= r.images_per_s <= r.images_per_s_q3 <= r.images_per_s_max
        assert r.images_per_s_iqr == pytest.approx(r.images_per_s_q3 - r.images_per_s_q1)
        # odd window count: the median latency window is the median throughput window
        assert r.latency_ms == pytest.approx(1000.0 * r.batch_size / r.images_per_s)
        assert r.peak_mem_bytes > 0 and r.peak_mem_source.startswith("cpu_process_peak_rss")
        assert r.threads == torch.get_num_threads()
        assert r.energy_j is None and r.joules_per_image is None
    # every forward ran in eval mode under inference_mode without autocast; the caller's mode is restored
    assert log.calls and all(not c["training"] and c["inference"] and not c["autocast"] for c in log.calls)
    assert model.training
    # warm-up plus timed iterations account for every forward, per batch size
    for r in results:
        assert sum(c["batch"] == r.batch_size for c in log.calls) == r.warmup_iters + sum(r.window_iters)


def test_warmup_iterations_and_seconds_honoured():
    model = tiny_vit()
    log = CallLog(model)
    by_iters = measure_throughput(model, ThroughputConfig(batch_sizes=(2,), dtypes=("fp32",), device="cpu",
                                                          warmup_iters=7, warmup_s=0.0, window_s=0.02, windows=1,
                                                          progress=False))[0]
    assert by_iters.warmup_iters >= 7
    assert len(log.calls) == by_iters.warmup_iters + sum(by_iters.window_iters)
    by_time = measure_throughput(model, ThroughputConfig(batch_sizes=(2,), dtypes=("fp32",), device="cpu",
                                                         warmup_iters=1, warmup_s=0.25, window_s=0.02, windows=1,
                                                         progress=False))[0]
    assert by_time.warmup_s >= 0.25  # one iteration takes far less: the warm-up ran on for the time
    assert len(log.calls) == by_iters.warmup_iters + sum(by_iters.window_iters) + by_time.warmup_iters + sum(
        by_time.window_iters)


def test_window_count_and_batch_order():
    cfg = ThroughputConfig(batch_sizes=(3, 1, 2), dtypes=("fp32",), device="cpu",
                           **{**FAST, "windows": 4})
    results = measure_throughput(tiny_vit(), cfg)
    assert [r.batch_size for r in results] == [3, 1, 2]
    assert all(r.windows == 4 and len(r.window_seconds) == 4 for r in results)
    ordered = sorted(results[0].window_images_per_s)
    assert results[0].images_per_s == pytest.approx((ordered[1] + ordered[2]) / 2)  # median of an even count


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cpu_half_precision_runs_or_is_recorded_unsupported(dtype):
    model = tiny_vit(depth=1)
    log = CallLog(model)
    r = measure_throughput(model, ThroughputConfig(batch_sizes=(2,), dtypes=(dtype,), device="cpu", **FAST))[0]
    assert r.dtype == dtype and r.autocast
    assert r.status in ("ok", "unsupported")
    if r.status == "ok":
        assert r.images_per_s > 0 and r.latency_ms > 0
        assert all(c["autocast"] and c["out_dtype"] == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
                   for c in log.calls)
    else:
        assert r.error and r.images_per_s is None and r.telemetry is not None


def test_model_error_is_recorded_and_run_goes_on():
    # input_size disagrees with the model's fixed 32x32 patch grid: every forward raises inside timm
    cfg = ThroughputConfig(batch_sizes=(1, 2), dtypes=("fp32",), device="cpu", input_size=(3, 40, 40), **FAST)
    results = measure_throughput(tiny_vit(), cfg)
    assert [(r.batch_size, r.status) for r in results] == [(1, "error"), (2, "error")]
    assert all(r.error and r.images_per_s is None and r.windows == 0 for r in results)
    assert all(r.telemetry is not None and r.telemetry.device == "cpu" for r in results)


def test_cpu_telemetry_record():
    r = measure_throughput(tiny_vit(), ThroughputConfig(batch_sizes=(1,), dtypes=("fp32",), device="cpu", **FAST))[0]
    t = r.telemetry
    assert isinstance(t, Telemetry)
    assert t.device == "cpu" and t.threads == torch.get_num_threads() >= 1
    assert t.cpu_model and isinstance(t.cpu_model, str)
    assert t.nvml_error and "cpu" in t.nvml_error
    assert t.name is None and t.energy_j is None and t.energy_method is None
    assert t.load_avg_1m is None or t.load_avg_1m >= 0
    snap = read_telemetry("cpu")
    assert snap.device == "cpu" and snap.nvml_error and snap.cpu_model == t.cpu_model


def test_cuda_telemetry_never_raises():
    t = read_telemetry("cuda:0")
    assert t.device.startswith("cuda") and t.threads >= 1 and t.cpu_model
    if not torch.cuda.is_available():
        assert t.nvml_error and t.name is None
    assert t.nvml_error is not None or t.uuid  # either NVML answered or the reason why not is recorded


def test_throttle_reason_decoding():
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x1) == ["gpu_idle"]
    assert decode_throttle_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_throttle_reasons(0x8 | 0x10000) == ["hw_slowdown", "unknown_0x10000"]


def test_measure_pair_speedup_ratio():
    baseline, smaller = tiny_vit(depth=6), tiny_vit(depth=1)
    cfg = ThroughputConfig(batch_sizes=(1, 4), dtypes=("fp32",), device="cpu", **FAST)
    pair = measure_pair(baseline, smaller, cfg, baseline_label="base", label="small")
    assert [r.label for r in pair.baseline] == ["base", "base"] and [r.label for r in pair.model] == ["small", "small"]
    assert [(s.dtype, s.requested_batch_size, s.batch_size) for s in pair.speedups] == [("fp32", 1, 1), ("fp32", 4, 4)]
    for s, b, m in zip(pair.speedups, pair.baseline, pair.model):
        assert s.baseline_images_per_s == b.images_per_s and s.images_per_s == m.images_per_s
        # the median of the adjacent window-pair ratios (B0 M0 B1 M1 ...), 2n - 1 of them: of the windows' thread
        # CPU time with one torch thread, of their wall time otherwise
        one = torch.get_num_threads() == 1
        assert s.basis == ("cpu_time" if one else "wall")
        w_b, w_m = ((b.window_cpu_images_per_s, m.window_cpu_images_per_s) if one
                    else (b.window_images_per_s, m.window_images_per_s))
        expected = [w_m[i] / w_b[j] for i in range(len(w_m)) for j in (i, i + 1) if j < len(w_b)]
        assert s.window_ratios == pytest.approx(expected) and len(expected) == 2 * b.windows - 1
        assert s.speedup == pytest.approx(statistics.median(expected)) and s.note is None
        assert min(expected) <= s.speedup <= max(expected)
    # one block instead of six: the ratio must point the right way (not a speed goal, a sign check)
    assert pair.speedup(4, "fp32") > 1.2
    with pytest.raises(KeyError):
        pair.speedup(64, "fp32")


def test_pair_cells_pick_the_compared_records_after_an_oom_fallback():
    def rec(label, batch, status="ok", ips=100.0):
        return ThroughputResult(label=label, batch_size=batch, requested_batch_size=64, dtype="fp16", device="cuda",
                                status=status, images_per_s=ips if status == "ok" else None)
    # baseline fitted 64; the model did not and fell back to 32, so the baseline was measured again at 32
    pair = PairResult(baseline=[rec("base", 64, ips=500.0), rec("base", 32, ips=450.0)],
                      model=[rec("m", 64, "oom"), rec("m", 32, ips=900.0)],
                      speedups=[Speedup("fp16", 64, 32, 450.0, 900.0, 2.0, "batch 64 did not fit; compared at 32")])
    [(s, base, model)] = pair.cells()
    assert (base.batch_size, base.images_per_s, model.batch_size, model.status) == (32, 450.0, 32, "ok")
    # a side that never ran OK: its last try is returned, and no speed-up is claimed
    failed = PairResult(baseline=[rec("base", 64, "oom"), rec("base", 32, "oom")], model=[rec("m", 64, ips=9.0)],
                        speedups=[Speedup("fp16", 64, None, None, 9.0, None, "baseline: oom")])
    [(s, base, model)] = failed.cells()
    assert (base.batch_size, base.status, model.batch_size, s.speedup) == (32, "oom", 64, None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtypes=("fp8",)), "dtypes: 'fp8' unknown; allowed: fp32, bf16, fp16"),
    (dict(dtypes=()), "dtypes: empty"),
    (dict(batch_sizes=(0,)), "batch_sizes: 0 is not an integer >= 1"),
    (dict(batch_sizes=(2.5,)), "batch_sizes: 2.5 is not an integer >= 1"),
    (dict(batch_sizes=()), "batch_sizes: empty"),
    (dict(batch_sizes=None), "batch_sizes: None is not a sequence"),
    (dict(windows=0), "windows: 0 is not an integer >= 1"),
    (dict(window_s=0.0), "window_s: 0.0 is not a finite number > 0"),
    (dict(window_s=math.inf), "window_s: inf"),
    (dict(warmup_s=-1), "warmup_s: -1 is not a finite number >= 0"),
    (dict(warmup_iters=-1), "warmup_iters: -1 is not an integer >= 0"),
    (dict(device="tpu"), "device: 'tpu'"),
    (dict(device="mps"), "device: 'mps' unsupported; allowed: auto, cpu, cuda, cuda:N"),
    (dict(input_size=(3, 32)), "input_size: (3, 32) is not (C, H, W)"),
    (dict(progress="yes"), "progress: 'yes' is not a bool"),
])
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        ThroughputConfig(**kwargs)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_config_normalises_and_round_trips():
    cfg = ThroughputConfig(batch_sizes=[64, 1, 64], dtypes="bf16", input_size=[3, 32, 32])
    assert cfg.batch_sizes == (64, 1) and cfg.dtypes == ("bf16",) and cfg.input_size == (3, 32, 32)
    assert ThroughputConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="^bogus: unknown throughput setting"):
        ThroughputConfig.from_dict({"bogus": 1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_requested_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="^device: 'cuda' requested but torch.cuda.is_available"):
        measure_throughput(tiny_vit(), ThroughputConfig(device="cuda", progress=False))
    assert resolve_device("auto") == torch.device("cpu")


def test_json_round_trip():
    cfg = ThroughputConfig(batch_sizes=(2,), dtypes=("fp32",), device="cpu", **FAST)
    pair = measure_pair(tiny_vit(depth=2), tiny_vit(depth=1), cfg)
    for r in pair.baseline + pair.model:
        back = ThroughputResult.from_dict(json.loads(json.dumps(r.to_dict())))
        assert back == r and isinstance(back.telemetry, Telemetry)
    text = json.dumps(pair.to_dict())
    assert PairResult.from_dict(json.loads(text)) == pair
    error = measure_throughput(tiny_vit(), ThroughputConfig(batch_sizes=(1,), dtypes=("fp32",), device="cpu",
                                                            input_size=(3, 40, 40), **FAST))[0]
    assert ThroughputResult.from_dict(json.loads(json.dumps(error.to_dict()))) == error


def test_environment_info_cpu():
    info = environment_info("cpu")
    assert json.loads(json.dumps(info)) == info
    assert info["torch"] == torch.__version__ and info["python"].count(".") == 2
    for key in ("timm", "optuna", "fvcore", "cuda_runtime", "cudnn", "gpu_name", "gpu_driver", "cpu_model",
                "logical_cores", "torch_threads", "os", "hostname", "tpsexplore", "git_commit"):
        assert key in info
    assert info["timm"] and info["optuna"] and info["fvcore"]
    assert info["device"] == "cpu" and info["gpu_name"] is None and "cpu" in info["nvml_error"]
    assert info["torch_threads"] == torch.get_num_threads() and info["logical_cores"] >= 1 and info["cpu_model"]
    assert info["tpsexplore"]
    assert environment_info("auto")["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="^device: 'gpu0' is not a device"):
        environment_info("gpu0")


@needs_cuda
def test_gpu_protocol_and_telemetry():
    model = tiny_vit()
    cfg = ThroughputConfig(batch_sizes=(1, 16), device="cuda", **{**FAST, "window_s": 0.1})
    results = measure_throughput(model, cfg)
    assert [(r.dtype, r.batch_size) for r in results] == [(d, b) for d in ("fp32", "bf16", "fp16") for b in (1, 16)]
    for r in results:
        assert r.status == "ok" or (r.dtype == "bf16" and r.status == "unsupported"), r.error
        t = r.telemetry
        assert t.device.startswith("cuda") and t.name
        if r.status != "ok":
            continue
        assert r.timer == "cuda_events" and r.peak_mem_source == "cuda_max_memory_allocated"
        assert r.peak_mem_bytes > 0 and r.images_per_s > 0 and all(s >= 0.1 for s in r.window_seconds)
        if t.nvml_error is None:
            assert t.uuid.startswith(("GPU-", "MIG-")) and t.driver_version
            assert isinstance(t.throttle_reasons, list)
            if t.energy_method is not None:
                assert t.energy_j is not None and t.energy_j >= 0 and r.joules_per_image == pytest.approx(
                    t.energy_j / (sum(r.window_iters) * r.batch_size))
    assert next(model.parameters()).device.type == "cuda"
    info = environment_info("cuda")
    assert info["gpu_name"] and info["gpu_memory_bytes"] > 0


@needs_cuda
def test_gpu_oom_halves_batch_until_it_fits():
    model = tiny_vit(img_size=64)
    total = torch.cuda.get_device_properties(0).total_memory
    cfg = ThroughputConfig(batch_sizes=(2 ** 15,), dtypes=("fp32",), device="cuda:0",
                           **{**FAST, "windows": 1, "warmup_iters": 1})
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2 ** 30 / total), 0)  # 1 GiB cap; input alone is 1.6 GB
    try:
        results = measure_throughput(model, cfg)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    assert results[0].status == "oom" and results[0].batch_size == 2 ** 15 and "memory" in results[0].error.lower()
    assert all(r.requested_batch_size == 2 ** 15 for r in results)
    assert [r.batch_size for r in results] == [2 ** 15 // 2 ** i for i in range(len(results))]
    assert all(r.status == "oom" for r in results[:-1]) and results[-1].status == "ok"
    assert results[-1].images_per_s > 0 and results[-1].peak_mem_bytes <= 2 ** 30
