"""Proxy pre-training: time and validation accuracy of an unreduced backbone trained from random init on
the proxy task (the stand-in for ImageNet weights offline; cluttered digits by default, ``--proxy digits``
for the original one).

Target: deit_t reaches >= TARGET_TOP1 val top-1 within TARGET_SECONDS on 2 CPU cores at the default geometry.
Each run trains into a fresh temporary cache (nothing is reused) through `proxy_backbone`, so it times
exactly what a first `tpsexplore` run does. Wall time depends on what else runs on the machine: the
record carries the load average before and after, and the process CPU time.

    python benchmarks/proxy_pretrain.py                                   # deit_t, default recipe
    python benchmarks/proxy_pretrain.py --backbone deit_t deit_s --img-size 40 --patch-size 8 --steps 800
    python benchmarks/proxy_pretrain.py --proxy digits --epochs 14                # the original proxy

Merges its runs into benchmarks/results/proxy_pretrain.json (one entry per backbone/geometry/recipe/seed).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tpsexplore.measure.environment import environment_info
from tpsexplore.measure.train import ProxyConfig, proxy_backbone

TARGET_TOP1 = 0.85
TARGET_SECONDS = 300.0


def run_one(backbone: str, seed: int, cfg: ProxyConfig, progress: bool) -> dict:
    load_before = os.getloadavg()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        _, info = proxy_backbone(backbone, seed=seed, cache_dir=cache, progress=progress, cfg=cfg)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "backbone": backbone,
        "seed": seed,
        "proxy": cfg.proxy,
        "proxy_definition": info.get("proxy"),
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_patches": info["num_patches"],
        "num_tokens": info["num_tokens"],
        "epochs": info["epochs"],
        "steps": info["steps"],
        "batch_size": cfg.batch_size,
        "lr": info["lr"],
        "proxy_shift": cfg.proxy_shift,
        "val_top1": info["val_top1"],
        "val_top5": info["val_top5"],
        "n_val": info["n_val"],
        "train_seconds": info["train_seconds"],
        "total_seconds": wall,
        "cpu_seconds": cpu,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "meets_top1": info["val_top1"] >= TARGET_TOP1,
        "meets_time": wall <= TARGET_SECONDS,
        "weights_note": info["weights_note"],
        "proxy_config": asdict(cfg),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", nargs="+", default=["deit_t"])
    ap.add_argument("--seed", type=int, default=0)
    defaults = ProxyConfig()
    ap.add_argument("--img-size", type=int, default=defaults.img_size)
    ap.add_argument("--patch-size", type=int, default=defaults.patch_size)
    ap.add_argument("--proxy", default=defaults.proxy, help="proxy name: cluttered (default) or digits")
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--epochs", type=float, default=defaults.epochs, help="passes over the training digits "
                    "(overrides --steps)")
    ap.add_argument("--lr", type=float, default=defaults.lr, help="default: proxy_lr(width), 5e-4 for deit_t")
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--shift", type=float, default=defaults.proxy_shift, help="random-shift augmentation")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "proxy_pretrain.json"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ProxyConfig(img_size=args.img_size, patch_size=args.patch_size, proxy=args.proxy, steps=args.steps,
                      epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, proxy_shift=args.shift,
                      min_top1=None)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    runs = doc.get("runs", [])
    for backbone in args.backbone:
        rec = run_one(backbone, args.seed, cfg, not args.quiet)
        print(f"{backbone} {cfg.proxy} {cfg.img_size}x{cfg.img_size}/p{cfg.patch_size} ({rec['num_patches']} "
              f"patches) {cfg.length}: val top-1 {rec['val_top1']:.3f} in {rec['total_seconds']:.0f} s "
              f"(cpu {rec['cpu_seconds']:.0f} s, load {rec['loadavg_before'][0]:.1f}->{rec['loadavg_after'][0]:.1f})",
              flush=True)
        key = ("backbone", "seed", "proxy_config")
        runs = [r for r in runs if any(r.get(k) != rec[k] for k in key)] + [rec]
    doc.update({  # other keys already in the file (e.g. the geometry search notes) are kept
        "what": "proxy pre-training of unreduced backbones on the proxy task (scikit-learn digits; cluttered by "
                "default; not ImageNet), from random init",
        "targets": {"val_top1": TARGET_TOP1, "seconds": TARGET_SECONDS, "backbone": "deit_t", "cores": 2},
        "environment": environment_info("cpu"),
        "runs": runs,
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
