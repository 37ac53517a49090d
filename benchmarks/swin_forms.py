"""Swin-T's two token-reduction forms, and similarity pruning, by measured CPU speed-up at comparable GMACs.

Swin-T (timm ``swin_tiny_patch4_window7_224``, random init: speed does not depend on weights), 224 px, eval, fp32,
CPU, batch 8, one torch thread. Each reduced model is measured right beside the unreduced one with
`tpsexplore.measure.throughput.measure_pair` (alternating timed windows; speed-up = median of adjacent window-pair
ratios, on CPU time). The FLOP-ideal speed-up is baseline GMACs / reduced GMACs from the analytic count
(`tpsexplore.measure.hier_flops.hier_reduced_macs`, equal to the trace); ``fraction`` = measured / ideal.

Entries (`reduce.swin_schedule` documents the forms):

* ``cheap`` (DynamicSwin's fast MLP path, stage 2 only) at ~0.90x (DynamicSwin-T/0.7 itself: keep 0.7/0.5/0.3 at
  stage 2's blocks 1-3) and ~0.79x (keep 0.15 from stage 2's first block; the form cannot go below ~0.74x);
* ``window`` (equal counts per window, frozen pruned tokens) at the same GMACs: the same stage-2 blocks with the
  keep ratio that matches, and ~0.65x with reductions in every stage;
* ``similarity`` (the preprint's pre-transformer pruning, window form in every stage) at ~0.90x and ~0.65x.

    python benchmarks/swin_forms.py                   # every entry, about 4 min on a quiet core
    python benchmarks/swin_forms.py --only cheap_090,window_090
    python benchmarks/swin_forms.py --quick           # proves the path (tiny windows), numbers mean nothing

Writes benchmarks/results/swin_forms.json (``--quick``: $TMPDIR/swin_forms_quick.json), merged entry by entry with
what is there, so the entries can be measured in several shorter runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from tpsexplore import ReductionConfig, apply, create_backbone
from tpsexplore.measure.environment import environment_info
from tpsexplore.measure.hier_flops import hier_analytic_macs, hier_geometry_from_model, hier_reduced_macs
from tpsexplore.measure.throughput import ThroughputConfig, measure_pair
from tpsexplore.reduce.swin_schedule import dynamicswin_config, swin_form

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 8
#: name -> config; Swin-T global blocks: stage 0 = 0-1, stage 1 = 2-3, stage 2 = 4-9, stage 3 = 10-11
ENTRIES = {
    "cheap_090": dynamicswin_config(0.7),  # DynamicSwin-T/0.7: 0.901x
    "window_090": ReductionConfig("dynamicvit", (5, 6, 7), (0.85,), swin_form="window"),  # 0.903x
    "similarity_090": ReductionConfig("similarity", (0,), (0.88,)),
    "cheap_079": ReductionConfig("dynamicvit", (4,), (0.15,), swin_form="cheap"),  # 0.781x
    "window_078": ReductionConfig("dynamicvit", (5, 6, 7), (0.65,), swin_form="window"),  # 0.781x
    "window_065": ReductionConfig("dynamicvit", (0, 2, 4, 10), (0.6,), swin_form="window"),  # 0.644x
    "similarity_065": ReductionConfig("similarity", (0,), (0.62,)),
}


def measure(name: str, cfg: ReductionConfig, baseline: torch.nn.Module, geo, tcfg: ThroughputConfig) -> dict:
    model = apply(copy.deepcopy(baseline), cfg)
    base_g = hier_analytic_macs(geo).gmacs
    g = hier_reduced_macs(cfg, geo).gmacs
    t0 = time.time()
    pair = measure_pair(baseline, model, tcfg, label=name)
    sp = pair.speedups[0]
    ideal = base_g / g
    return {"name": name, "form": swin_form(cfg), "config": cfg.to_dict(), "label": cfg.label,
            "gmacs": round(g, 4), "baseline_gmacs": round(base_g, 4), "gmacs_fraction": round(g / base_g, 4),
            "ideal_speedup": round(ideal, 4), "speedup": None if sp.speedup is None else round(sp.speedup, 4),
            "fraction_of_ideal": None if sp.speedup is None else round(sp.speedup / ideal, 4),
            "window_ratios": [round(r, 4) for r in sp.window_ratios], "basis": sp.basis,
            "baseline_images_per_s": sp.baseline_images_per_s, "images_per_s": sp.images_per_s,
            "batch_size": sp.batch_size, "note": sp.note, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated entry names (default: all)")
    ap.add_argument("--quick", action="store_true", help="tiny windows; results to $TMPDIR")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ENTRIES)
    bad = [n for n in names if n not in ENTRIES]
    if bad:
        print(f"--only: unknown entry {bad[0]!r}; allowed: {', '.join(ENTRIES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    baseline = create_backbone("swin_t", weights="random").eval()
    geo = hier_geometry_from_model(baseline)
    tcfg = ThroughputConfig(batch_sizes=(BATCH,), dtypes=("fp32",), device="cpu", warmup_iters=2,
                            warmup_s=0.0 if args.quick else 1.0, window_s=0.05 if args.quick else 1.5,
                            windows=1 if args.quick else 5, progress=False)
    out_path = Path(tempfile.gettempdir()) / "swin_forms_quick.json" if args.quick else RESULTS / "swin_forms.json"
    data = json.loads(out_path.read_text()) if out_path.exists() else {}
    entries = {e["name"]: e for e in data.get("entries", [])}
    for name in names:
        entry = measure(name, ENTRIES[name], baseline, geo, tcfg)
        entry["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entries[name] = entry
        print(f"{name:16s} {entry['label']:40s} {entry['gmacs_fraction']:.3f}x GMACs  speed-up {entry['speedup']}  "
              f"(ideal {entry['ideal_speedup']:.3f}, fraction {entry['fraction_of_ideal']})", flush=True)
        data = {"benchmark": "swin_forms", "model": "swin_tiny_patch4_window7_224", "img_size": 224,
                "batch_size": BATCH, "dtype": "fp32", "device": "cpu", "threads": 1, "weights": "random",
                "protocol": "measure_pair: alternating windows, speed-up = median of window-pair ratios",
                "command": "python benchmarks/swin_forms.py" + (" --quick" if args.quick else ""),
                "environment": environment_info(), "entries": [entries[n] for n in ENTRIES if n in entries]}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
