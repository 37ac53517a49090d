"""Measured CPU speed-up of token reduction on each hierarchical family against its FLOP ideal (issue 13, acc. 3).

One reduced config per family at about 0.65x the baseline's analytic GMACs: PVT v1 (``pvt_t``), PVT v2
(``pvt_v2_b1``), CvT (``cvt_13``) and Swin (``swin_t``; skipped with the reason when `apply` refuses it). The config
is the same rule for every family: DynamicViT (learned predictor, drop) at the first block of every stage, one keep
ratio (cumulative within each stage, `reduce.hier_schedule`; Swin: its window form, `reduce.swin_schedule`), the
ratio at two decimals whose analytic count (`tpsexplore.measure.flops.analytic_macs`, norms and predictors
included, equal to the trace) is closest to 0.65x. Every stage but PVT v1's last keeps its grid, so part of the
cost (K/V, spatial-reduction and depthwise convs) stays dense: that is in the count, hence in the ideal.

Protocol: random weights (speed does not depend on them), 224 x 224, eval, fp32, CPU, one torch thread, batch 8.
Each reduced model is measured right beside the unreduced one with
`tpsexplore.measure.throughput.measure_pair` (alternating timed windows; speed-up = median of the adjacent
window-pair ratios, on CPU time, with their min and max). FLOP ideal = baseline GMACs / reduced GMACs;
``fraction_of_ideal`` = measured / ideal. ``op_seconds``: self CPU seconds per forward of both models by op
category (torch.profiler, two forwards after the timed windows): matmuls (linear, attention), convolutions (patch
embeddings, spatial-reduction, depthwise), selection (gather/scatter/index/fill/sort: no MACs, real time) and the
rest (norms, GELU, copies), which says where a gap to the ideal comes from.

    python benchmarks/hier_speed.py                  # every family, under 4 min on a quiet core
    python benchmarks/hier_speed.py --only pvt_t,cvt_13
    python benchmarks/hier_speed.py --quick          # proves the path (short windows), numbers mean nothing

Writes benchmarks/results/hier_speed.json (``--quick``: $TMPDIR/hier_speed_quick.json).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tpsexplore import ReductionConfig, apply, create_backbone
from tpsexplore.measure.environment import environment_info
from tpsexplore.measure.flops import analytic_macs
from tpsexplore.measure.hier_flops import hier_geometry_from_model
from tpsexplore.measure.throughput import ThroughputConfig, measure_pair

FAMILIES = {"pvt_t": "PVT v1", "pvt_v2_b1": "PVT v2", "cvt_13": "CvT", "swin_t": "Swin"}
TARGET = 0.65
BATCH = 8
IMG = 224
RESULTS = Path(__file__).resolve().parent / "results"
CATEGORIES = (("conv", re.compile(r"conv")),
              ("matmul", re.compile(r"addmm|\bmm\b|aten::mm|bmm|matmul|linear|scaled_dot|attention")),
              ("selection", re.compile(r"index|gather|scatter|topk|sort|fill|zero|cumsum|masked|where|nonzero")))


def op_seconds(model: torch.nn.Module, x: torch.Tensor, iters: int = 2) -> dict[str, float]:
    """Self CPU seconds per forward by op category (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(x)
    out = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    for e in prof.key_averages():
        key = e.key.lower()
        if not key.startswith("aten::"):
            continue
        cat = next((name for name, pat in CATEGORIES if pat.search(key)), "other")
        out[cat] += e.self_cpu_time_total / 1e6 / iters
    return {k: round(v, 4) for k, v in out.items()}


def config_near(geo: Any, family: str, target: float = TARGET) -> tuple[ReductionConfig, float]:
    """DynamicViT at the first block of every stage with the keep ratio (two decimals) whose analytic GMACs are
    closest to ``target`` x the baseline's; returns the config and its fraction."""
    firsts, b = [], 0
    for st in geo.stages:
        firsts.append(b)
        b += st.depth
    extra = {"swin_form": "window"} if family == "swin" else {}
    base = analytic_macs(ReductionConfig(), geo).total
    best = None
    for k in range(5, 100):
        cfg = ReductionConfig("dynamicvit", tuple(firsts), (k / 100,), **extra)
        frac = analytic_macs(cfg, geo).total / base
        if best is None or abs(frac - target) < abs(best[1] - target):
            best = (cfg, frac)
    return best


def measure(name: str, tcfg: ThroughputConfig) -> dict[str, Any]:
    torch.manual_seed(0)
    baseline = create_backbone(name, weights="random").eval()
    geo = hier_geometry_from_model(baseline)
    entry: dict[str, Any] = {"backbone": name, "family": FAMILIES[name], "timm_name": geo.name}
    try:
        cfg, frac = config_near(geo, geo.family)
        reduced = apply(copy.deepcopy(baseline), cfg)
    except (ValueError, TypeError) as exc:  # a family token reduction does not take (yet)
        entry.update(status="skipped", reason=f"{type(exc).__name__}: {exc}")
        return entry
    base_g, red_g = analytic_macs(ReductionConfig(), geo).gmacs, analytic_macs(cfg, geo).gmacs
    with torch.inference_mode():
        reduced(torch.zeros(1, 3, IMG, IMG))
    counts = list(getattr(reduced, "tps_last_info").token_counts)
    t0 = time.perf_counter()
    pair = measure_pair(baseline, reduced, tcfg, baseline_label=f"{name} baseline", label=cfg.label)
    s = pair.speedups[0]
    x = torch.randn(tcfg.batch_sizes[0], 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    ops = {"baseline": op_seconds(baseline, x), "reduced": op_seconds(reduced, x)}
    ideal = base_g / red_g
    ratios = s.window_ratios
    entry.update(
        status="ok" if s.speedup is not None else "failed", config=cfg.to_dict(), label=cfg.label,
        baseline_gmacs=round(base_g, 4), reduced_gmacs=round(red_g, 4), gmacs_fraction=round(frac, 4),
        ideal_speedup=round(ideal, 4), measured_speedup=None if s.speedup is None else round(s.speedup, 4),
        fraction_of_ideal=None if s.speedup is None else round(s.speedup / ideal, 4),
        window_ratio_min=round(min(ratios), 4) if ratios else None,
        window_ratio_max=round(max(ratios), 4) if ratios else None, window_ratios=[round(r, 4) for r in ratios],
        basis=s.basis, batch_size=s.batch_size, note=s.note,
        baseline_images_per_s=s.baseline_images_per_s, images_per_s=s.images_per_s,
        token_counts=[list(c) for c in counts], op_seconds=ops, seconds=round(time.perf_counter() - t0, 1))
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(FAMILIES)}")
    ap.add_argument("--quick", action="store_true", help="short windows: proves the path, numbers mean nothing")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FAMILIES)
    bad = [n for n in names if n not in FAMILIES]
    if bad:
        print(f"--only: unknown backbone {bad[0]!r}; allowed: {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    tcfg = ThroughputConfig(batch_sizes=(2 if args.quick else BATCH,), dtypes=("fp32",), device="cpu",
                            input_size=(3, IMG, IMG), warmup_iters=1 if args.quick else 2,
                            warmup_s=0.0 if args.quick else 1.0, window_s=0.05 if args.quick else 2.0,
                            windows=2 if args.quick else 5, progress=False)
    out_path = Path(tempfile.gettempdir()) / "hier_speed_quick.json" if args.quick else RESULTS / "hier_speed.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    t0 = time.perf_counter()
    for name in names:
        entry = measure(name, tcfg)
        entries.append(entry)
        if entry["status"] == "ok":
            print(f"{name:10s} {entry['label']:32s} {entry['baseline_gmacs']:.3f} -> {entry['reduced_gmacs']:.3f} "
                  f"GMACs ({entry['gmacs_fraction']:.3f}x): measured {entry['measured_speedup']:.3f}x "
                  f"[{entry['window_ratio_min']:.3f}-{entry['window_ratio_max']:.3f}] vs ideal "
                  f"{entry['ideal_speedup']:.3f}x ({entry['fraction_of_ideal']:.2f} of ideal)", flush=True)
        else:
            print(f"{name:10s} {entry['status']}: {entry.get('reason') or entry.get('note')}", flush=True)
        data = {"benchmark": "hier_speed", "target_gmacs_fraction": TARGET, "img_size": IMG,
                "protocol": {"weights": "random", "mode": "eval", "dtype": "fp32", "device": "cpu", "threads": 1,
                             "batch_size": tcfg.batch_sizes[0], "warmup_s": tcfg.warmup_s,
                             "window_s": tcfg.window_s, "windows": tcfg.windows,
                             "speedup": "median of adjacent window-pair ratios (measure_pair), CPU time"},
                "config_rule": "dynamicvit at the first block of every stage, one keep ratio (two decimals) with "
                               "analytic GMACs closest to 0.65x the baseline's (Swin: window form)",
                "command": "python benchmarks/hier_speed.py" + (" --quick" if args.quick else "")
                           + (f" --only {args.only}" if args.only else ""),
                "environment": environment_info(), "seconds": round(time.perf_counter() - t0, 1),
                "entries": entries}
        out_path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out_path} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
