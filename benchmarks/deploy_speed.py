"""Deployed speed of token reduction: measured speed-up on onnxruntime and torch.compile vs its FLOP-ideal.

DeiT-S (random init, 224 px: speed does not depend on weights), batch 64, CPU fp32. eTPS, EViT and Top-K at keep
0.7 on blocks [3, 6, 9], ToMe r=13. For every runtime (onnxruntime, torch.compile, and eager for reference) each
method is measured right beside the unreduced baseline on the same runtime with the paired protocol of
`tpsexplore profile` (`tpsexplore.measure.profile.runtime_model` + `measure_pair`: alternating windows, speed-up =
median of adjacent window-pair ratios). The FLOP-ideal speed-up is baseline GMACs / reduced GMACs from the analytic
counter (`tpsexplore.measure.flops.analytic_macs`); ``fraction`` = measured / ideal. Where the fraction is below 0.8
the entry says why, from an op-time breakdown of both models on that runtime (torch.profiler for eager and compile,
onnxruntime's own profiler for onnxruntime): the share of token selection/merging ops (sort/TopK, gather, scatter,
index: ~zero FLOPs but real time), how fast the matmuls run on fewer tokens, and the rest.

    python benchmarks/deploy_speed.py                          # the full run: ~15-25 min on 2 CPU cores
    python benchmarks/deploy_speed.py --quick                  # proves the path: DeiT-Tiny, batch 2, short windows

Writes benchmarks/results/deploy_speed.json (``--quick``: $TMPDIR/deploy_speed_quick.json, numbers that mean
nothing), updated after every entry.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tpsexplore import ReductionConfig, apply, create_backbone
from tpsexplore.measure.environment import environment_info
from tpsexplore.measure.flops import analytic_macs, geometry_from_model
from tpsexplore.measure.profile import RUNTIMES, OnnxRuntimeModule, runtime_model
from tpsexplore.measure.throughput import ThroughputConfig, measure_pair

METHODS = ("etps", "evit", "topk", "tome")
TARGET = 0.8  # acceptance: measured speed-up >= 0.8 x the FLOP-ideal one
RESULTS = Path(__file__).resolve().parent / "results"

# op categories of the breakdown, matched on lower-case op / kernel names of both profilers
SELECTION = re.compile(r"topk|sort|gather|scatter|index|take_along|cumsum|argmax|argmin|nonzero|masked|where")
MATMUL = re.compile(r"addmm|\bmm\b|aten::mm|bmm|matmul|linear|gemm|scaled_dot|attention|conv|mkldnn_|_mm\b")


def config_for(method: str, r: int) -> ReductionConfig:
    if method == "tome":
        return ReductionConfig("tome", r=r)
    return ReductionConfig(method, (3, 6, 9), (0.7,))


def category(name: str) -> str:
    low = name.lower()
    if SELECTION.search(low):
        return "selection"
    if MATMUL.search(low):
        return "matmul"
    return "other"


def torch_breakdown(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, iters: int) -> dict[str, float]:
    """Self CPU seconds per call by op category (torch.profiler; inductor's kernels by their names)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                fn(x)
    out = {"selection": 0.0, "matmul": 0.0, "other": 0.0}
    for e in prof.key_averages():
        if e.key.startswith(("ProfilerStep", "Torch-Compiled Region", "CompiledFunction")):
            continue
        out[category(e.key)] += e.self_cpu_time_total / 1e6 / iters
    return out


def ort_breakdown(module: OnnxRuntimeModule, x: torch.Tensor, iters: int) -> dict[str, float]:
    """Node seconds per call by op category, from onnxruntime's own profiler on a fresh profiling session."""
    import onnxruntime as ort

    path = str(module.paths[int(x.shape[0])])  # the exported file of this batch size
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "tpsx-ort-profile")
    prof = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {prof.get_inputs()[0].name: x.numpy()}
    prof.run(None, feed)
    for _ in range(iters):
        prof.run(None, feed)
    trace = prof.end_profiling()
    try:
        events = json.loads(Path(trace).read_text())
    finally:
        os.unlink(trace)
    out = {"selection": 0.0, "matmul": 0.0, "other": 0.0}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            out[category(e.get("args", {}).get("op_name", ""))] += e["dur"] / 1e6 / (iters + 1)
    return out


def why(runtime: str, measured: float, ideal: float, base: dict[str, float], red: dict[str, float],
        base_gmacs: float, red_gmacs: float) -> dict[str, Any]:
    """The breakdown's reading: which part keeps the measured speed-up below the FLOP-ideal one."""
    red_total, base_total = sum(red.values()) or 1e-12, sum(base.values()) or 1e-12
    sel_share = red["selection"] / red_total
    matmul_eff = ((red_gmacs / red["matmul"]) / (base_gmacs / base["matmul"])
                  if red["matmul"] > 0 and base["matmul"] > 0 else None)
    other_ratio = red["other"] / base["other"] if base["other"] > 0 else None
    reasons = []
    if sel_share >= 0.08:
        reasons.append(f"gather/sort overhead: token selection and merging ops (sort/TopK, gather, scatter, index) "
                       f"take {sel_share:.0%} of the reduced model's time but ~0 of its FLOPs")
    if matmul_eff is not None and matmul_eff < 0.9:
        reasons.append(f"smaller matmuls: on the fewer tokens they run at {matmul_eff:.2f}x the baseline's GMAC/s")
    if other_ratio is not None and other_ratio > red_gmacs / base_gmacs * 1.15:
        reasons.append(f"ops outside the matmuls and token selection (norms, softmax, GELU, copies, and the "
                       f"reduction's own elementwise work such as ToMe's key normalisation and size-weighted "
                       f"averages): {other_ratio:.2f}x the baseline's time where the FLOPs fall to "
                       f"{red_gmacs / base_gmacs:.2f}x")
    if not reasons:
        reasons.append("no single category dominates: the time saved is spread thinly (see breakdown)")
    text = (f"{runtime}: {measured:.2f}x measured is {measured / ideal:.2f} of the FLOP-ideal {ideal:.2f}x; "
            + "; ".join(reasons))
    return {"text": text, "selection_share": sel_share, "matmul_gmacs_per_s_vs_baseline": matmul_eff,
            "other_time_vs_baseline": other_ratio,
            "breakdown_s_per_batch": {"baseline": base, "reduced": red},
            "baseline_selection_share": base["selection"] / base_total,
            "note": "op categories from the profilers' op/kernel names; inductor fuses ops, so under compile "
                    "'other' holds fused kernels and the split is approximate"}


def write(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="prove the path: deit_t, batch 2, short windows, "
                        "one thread, every entry explained; writes $TMPDIR/deploy_speed_quick.json")
    parser.add_argument("--backbone", default=None, help="default deit_s (deit_t with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="default 64 (2 with --quick)")
    parser.add_argument("--runtimes", default="onnxruntime,compile,eager")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tome-r", type=int, default=13)
    parser.add_argument("--windows", type=int, default=None, help="timed windows per side (default 5; 2 quick)")
    parser.add_argument("--window-s", type=float, default=None, help="seconds per window (default 2; 0.2 quick)")
    parser.add_argument("--warmup-iters", type=int, default=2, help="warm-up iterations per side and cell")
    parser.add_argument("--threads", type=int, default=None, help="torch (and onnxruntime) threads (default: "
                        "torch's; 1 with --quick)")
    parser.add_argument("--profile-iters", type=int, default=2, help="iterations of each op-time breakdown")
    parser.add_argument("--explain-all", action="store_true", help="the op-time breakdown for every entry, not "
                        "only those below the target (--quick implies it, to exercise that path)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    backbone = args.backbone or ("deit_t" if quick else "deit_s")
    batch = args.batch or (2 if quick else 64)
    windows = args.windows or (2 if quick else 5)
    window_s = args.window_s or (0.2 if quick else 2.0)
    threads = args.threads or (1 if quick else None)
    if threads:
        torch.set_num_threads(threads)
    runtimes = [r for r in args.runtimes.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    for r in runtimes:
        if r not in RUNTIMES:
            parser.error(f"--runtimes: {r!r} unknown; allowed: {', '.join(RUNTIMES)}")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "deploy_speed_quick.json" if quick
                                           else RESULTS / "deploy_speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    # one compiled graph per model, plus one more per model when the op-time breakdown runs it under the profiler
    # (a guard change): above Dynamo's default limit of 8 per code object, which fullgraph=True turns into an error
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * (len(methods) + 1))
    torch.manual_seed(0)
    baseline = create_backbone(backbone, weights="random").eval()
    geo = geometry_from_model(baseline)
    base_gmacs = analytic_macs(ReductionConfig(), geo).gmacs
    tcfg = ThroughputConfig(batch_sizes=(batch,), dtypes=("fp32",), device="cpu", warmup_iters=args.warmup_iters,
                            warmup_s=0.0, window_s=window_s, windows=windows, progress=False)
    payload: dict[str, Any] = {
        "benchmark": "deploy_speed",
        "command": " ".join(["python", "benchmarks/deploy_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": quick,
        "settings": {"backbone": backbone, "timm_name": baseline.tps_backbone.timm_name if hasattr(
                         baseline, "tps_backbone") else None, "img_size": list(geo.img_size), "weights": "random init",
                     "batch_size": batch, "dtype": "fp32", "device": "cpu", "threads": torch.get_num_threads(),
                     "runtimes": runtimes, "methods": methods, "target_fraction": TARGET,
                     "protocol": tcfg.to_dict()},
        "baseline_gmacs": base_gmacs,
        "environment": environment_info("cpu"),
        "results": [],
        "below_target": [],
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tpsx-deploy-speed-") as tmp:
        for runtime in runtimes:
            print(f"[deploy_speed] {runtime}: preparing the baseline", file=sys.stderr, flush=True)
            run_base, base_info = runtime_model(baseline, runtime, (batch,), tmp, "cpu", f"baseline_{runtime}")
            base_breakdown = None
            for method in methods:
                cfg = config_for(method, args.tome_r)
                model = apply(copy.deepcopy(baseline), cfg).eval()
                red_gmacs = analytic_macs(cfg, geo).gmacs
                print(f"[deploy_speed] {runtime}: {cfg.label}", file=sys.stderr, flush=True)
                run_model, info = runtime_model(model, runtime, (batch,), tmp, "cpu", f"{method}_{runtime}")
                pair = measure_pair(run_base, run_model, tcfg, baseline_label="baseline", label=cfg.label)
                [(s, b, m)] = pair.cells()
                ideal = base_gmacs / red_gmacs
                fraction = s.speedup / ideal if s.speedup is not None else None
                entry: dict[str, Any] = {
                    "runtime": runtime, "method": method, "label": cfg.label, "config": cfg.to_dict(),
                    "gmacs": red_gmacs, "baseline_gmacs": base_gmacs, "flop_ideal_speedup": ideal,
                    "measured_speedup": s.speedup, "fraction": fraction,
                    "meets_target": fraction is not None and fraction >= TARGET,
                    "window_ratios": s.window_ratios,
                    "speedup_spread": [min(s.window_ratios), max(s.window_ratios)] if s.window_ratios else None,
                    "images_per_s": m.images_per_s, "baseline_images_per_s": b.images_per_s,
                    "status": [b.status, m.status], "error": b.error or m.error or s.note,
                    "loaded": bool((m.contention and m.contention.loaded) or (b.contention and b.contention.loaded)),
                    "runtime_info": {"baseline": base_info, "model": info},
                    "why": None,
                }
                if fraction is not None and (fraction < TARGET or args.explain_all or quick):
                    x = torch.randn(batch, *geo_shape(geo))
                    if base_breakdown is None:
                        base_breakdown = breakdown(run_base, x, args.profile_iters)
                    entry["why"] = why(runtime, s.speedup, ideal, base_breakdown,
                                       breakdown(run_model, x, args.profile_iters), base_gmacs, red_gmacs)
                if fraction is not None and fraction < TARGET:
                    payload["below_target"].append({"runtime": runtime, "method": method, "fraction": fraction,
                                                    "why": entry["why"]["text"]})
                payload["results"].append(entry)
                payload["seconds"] = time.perf_counter() - t_start
                write(out, payload)
                print(f"[deploy_speed]   {s.speedup or float('nan'):.3f}x measured, {ideal:.3f}x ideal, "
                      f"fraction {fraction or float('nan'):.2f}", file=sys.stderr, flush=True)
                del run_model, model
    payload["summary"] = summary(payload["results"])
    payload["seconds"] = time.perf_counter() - t_start
    write(out, payload)
    print(json.dumps(payload["summary"], indent=2))
    print(f"written {out}", file=sys.stderr)
    return 0


def geo_shape(geo: Any) -> tuple[int, int, int]:
    return (geo.in_chans, *geo.img_size)


def breakdown(module: Any, x: torch.Tensor, iters: int) -> dict[str, float]:
    if isinstance(module, OnnxRuntimeModule):
        return ort_breakdown(module, x, iters)
    return torch_breakdown(module, x, iters)


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """{runtime: {method: "measured x / ideal x = fraction"}} and each runtime's median fraction."""
    out: dict[str, Any] = {}
    for r in results:
        row = out.setdefault(r["runtime"], {})
        if r["fraction"] is None:
            row[r["method"]] = f"failed: {r['error']}"
        else:
            row[r["method"]] = (f"{r['measured_speedup']:.2f}x / {r['flop_ideal_speedup']:.2f}x = "
                                f"{r['fraction']:.2f}" + ("" if r["meets_target"] else " (< 0.8: see why)"))
    for runtime, row in out.items():
        fr = [r["fraction"] for r in results if r["runtime"] == runtime and r["fraction"] is not None]
        row["median_fraction"] = statistics.median(fr) if fr else None
    return out


if __name__ == "__main__":
    sys.exit(main())
