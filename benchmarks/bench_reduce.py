"""Speed of the token-reduction core: measured speed-up of each method vs its FLOP-ratio ideal.

DeiT-S (random init; speed does not depend on weights), keep 0.7 at [3,6,9], ToMe r=13. Each method is
timed right beside the unpatched model (interleaved rounds, median of rounds), and the squeeze /
matching step is timed on its own at the real shapes to give its share of model time.

    python benchmarks/bench_reduce.py                      # CPU, batch 64, fp32
    python benchmarks/bench_reduce.py --device cuda --dtype bf16 --batch 256

Writes benchmarks/results/reduce_<device>_<dtype>_bs<batch>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tpsexplore import ReductionConfig, apply, create_backbone, remove, token_schedule
from tpsexplore.measure.environment import environment_info
from tpsexplore.measure.flops import analytic_macs, geometry_from_model
from tpsexplore.reduce import ops

METHODS = ["evit", "etps", "topk", "dtps", "dynamicvit", "tome", "similarity", "random", "rollout"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def config_for(method: str) -> ReductionConfig:
    if method == "tome":
        return ReductionConfig("tome", r=13)
    extra = {"similarity_placement": "layerwise"} if method == "similarity" else {}
    return ReductionConfig(method, (3, 6, 9), (0.7,), **extra)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, iters: int) -> float:
    """Seconds per call, synchronized before start and before stop."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def reduction_step_seconds(config: ReductionConfig, batch: int, dim: int, device: str, dtype, iters: int) -> float:
    """Time of the squeeze (TPS) or matching+merge (ToMe) steps alone, at the config's real shapes."""
    sched = token_schedule(config)
    total = 0.0
    for st in sched.stages:
        if config.effective_treatment == "squeeze":
            r = torch.randn(batch, st.kept, dim, device=device, dtype=dtype)
            p = torch.randn(batch, st.removed, dim, device=device, dtype=dtype)
            total += time_call(lambda: ops.squeeze(r, p), device, iters)
        elif config.spec.policy == "merge":
            t = st.before + 1
            x = torch.randn(batch, t, dim, device=device, dtype=dtype)
            k = torch.randn(batch, t, 64, device=device, dtype=dtype)
            size = torch.ones(batch, t, 1, device=device, dtype=dtype)

            def merge():
                plan = ops.bipartite_soft_matching(k, st.removed, 1)
                ops.merge_wavg(plan, x, size)
            total += time_call(merge, device, iters)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=0, help="forward passes per round (default: 2 CPU, 20 GPU)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    iters = args.iters or (20 if device == "cuda" else 2)
    torch.manual_seed(0)
    model = create_backbone("deit_s", weights="random").eval().to(device)
    geo = geometry_from_model(model)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    base_gmacs = analytic_macs(ReductionConfig(), geo).gmacs

    def forward():
        model(x)

    results = []
    with torch.inference_mode(), autocast:
        for method in args.methods.split(","):
            cfg = config_for(method)
            for _ in range(2):  # warm-up both paths
                remove(model)
                forward()
                apply(model, cfg)
                forward()
            base_t, red_t = [], []
            for _ in range(args.rounds):  # interleaved, so drift hits both alike
                remove(model)
                base_t.append(time_call(forward, device, iters))
                apply(model, cfg)
                red_t.append(time_call(forward, device, iters))
            remove(model)
            tb, tr = statistics.median(base_t), statistics.median(red_t)
            gmacs = analytic_macs(cfg, geo).gmacs
            step = reduction_step_seconds(cfg, args.batch, geo.embed_dim, device, dtype, iters=max(iters, 5))
            row = {
                "method": method, "config": cfg.label, "gmacs": round(gmacs, 4), "baseline_gmacs": round(base_gmacs, 4),
                "ideal_speedup": round(base_gmacs / gmacs, 4), "measured_speedup": round(tb / tr, 4),
                "fraction_of_ideal": round((tb / tr) / (base_gmacs / gmacs), 4),
                "baseline_img_per_s": round(args.batch / tb, 2), "img_per_s": round(args.batch / tr, 2),
                "reduction_step_share": round(step / tr, 5),
                "baseline_s": base_t, "reduced_s": red_t,
            }
            results.append(row)
            print(f"{method:<11} ideal {row['ideal_speedup']:.3f}x  measured {row['measured_speedup']:.3f}x "
                  f"({100 * row['fraction_of_ideal']:.1f}% of ideal)  step share {100 * row['reduction_step_share']:.2f}%",
                  flush=True)
    out = Path(args.out or f"benchmarks/results/reduce_{device}_{args.dtype}_bs{args.batch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "bench_reduce", "backbone": "deit_s", "batch": args.batch, "dtype": args.dtype,
               "device": device, "rounds": args.rounds, "iters_per_round": iters,
               "environment": environment_info(device), "results": results}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
