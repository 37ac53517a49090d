"""Does the default proxy tell token-reduction methods apart? (issue 9, acceptance item 1)

Runs the search's own code path (`build_settings` -> `Task.prepare` / `new_model` / `evaluate` /
`finetune`, `SearchSpace.default_params` / `from_params`, `config_seed`) on the default proxy at the
main command's budget (0.35) and checks:

1. the validation set has at least 4,000 images;
2. the unreduced deit_t reaches at least 85% top-1;
3. the published-default random pruning scores below the published-default Top-K, exact McNemar
   p < 0.01, zero-shot and after the search's fine-tune (40 steps, seeds from `config_seed`);
4. a Top-K config that keeps 1 patch token after block 4 loses at least 20 points against the
   baseline after the fine-tune.

The pre-trained backbone comes from the proxy cache (`$TPSEXPLORE_CACHE`, default ~/.cache/tpsexplore):
the first run trains it (its steps, seconds and accuracy are recorded), later runs load it.

    TPSEXPLORE_CACHE=/tmp/proxycache python benchmarks/proxy_discrimination.py

Writes benchmarks/results/proxy_discrimination.json (n, correct, Wilson 95% intervals of every accuracy,
paired differences with Newcombe intervals and exact McNemar p-values, the pre-training record).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from tpsexplore.measure.environment import environment_info
from tpsexplore.reduce import ReductionConfig, apply, token_schedule
from tpsexplore.search.objective import config_seed
from tpsexplore.search.space import SearchSpace, resolve_variants
from tpsexplore.search.spec import build_settings
from tpsexplore.search.task import Task
from tpsexplore.stats import Accuracy, mcnemar, paired_difference

MIN_VAL_IMAGES = 4000
MIN_BASELINE_TOP1 = 0.85
MAX_P = 0.01
MIN_ONE_TOKEN_DROP = 0.20
ONE_TOKEN_BLOCK = 4

# How the default design was chosen (scratch runs on a shared 2-core CPU, deit_t 56/p8 from random init, the
# search's Task path for the configs, val = the 4,000 fixed images; "1tok" = topk k0.408,0.05@3,4; zs = zero
# shot, ft = after the 40-step fine-tune; drops are fractions below the unreduced model without fine-tune).
DESIGN_HISTORY = [
    {"design": "digits 16-28 px, 2-4 fragments (3x3-5x5 source-pixel crops), ink 0.5-1.0", "steps": 500,
     "batch": 64, "lr": 5e-4, "warmup": 0.1, "val_top1": 0.160, "note": "does not learn (chance until step 400)"},
    {"design": "digits 22-34 px, 2-3 fragments (2x2-4x4 crops), ink 0.3-0.6", "steps": 500, "batch": 64,
     "lr": 1e-3, "warmup": 0.1, "val_top1": 0.209},
    {"design": "digits 16-28 px, no fragments", "steps": 500, "batch": 64, "lr": 5e-4, "warmup": 0.1,
     "val_top1": 0.595, "topk_zs": 0.555, "random_zs": 0.291, "1tok_drop_zs": 0.064, "1tok_drop_ft": 0.019},
    {"design": "default: digits 28-42 px, 1-3 fragments (2x2-4x4 crops), ink 0.3-0.6", "steps": 500, "batch": 64,
     "lr": 5e-4, "warmup": 0.1, "val_top1": 0.636, "topk_zs": 0.455, "random_zs": 0.347, "topk_ft": 0.514,
     "random_ft": 0.369, "1tok_drop_zs": 0.192, "1tok_drop_ft": 0.015},
    {"design": "default", "steps": 500, "batch": 64, "lr": 5e-4, "warmup": 0.3, "val_top1": 0.788,
     "topk_zs": 0.753, "random_zs": 0.410, "topk_ft": 0.750, "random_ft": 0.450, "1tok_drop_zs": 0.070,
     "1tok_drop_ft": 0.029},
    {"design": "default", "steps": 1000, "batch": 32, "lr": 5e-4, "warmup": 0.3, "val_top1": 0.827,
     "topk_zs": 0.763, "random_zs": 0.431, "topk_ft": 0.783, "random_ft": 0.485, "1tok_drop_zs": 0.100,
     "1tok_drop_ft": 0.049},
    {"design": "default", "steps": 1500, "batch": 64, "lr": 5e-4, "warmup": 0.1, "val_top1": 0.945,
     "val1000_by_step": {"250": 0.554, "500": 0.784, "750": 0.855, "1000": 0.924, "1250": 0.926},
     "topk_zs": 0.914, "random_zs": 0.514, "topk_ft": 0.928, "random_ft": 0.581, "1tok_drop_zs": 0.096,
     "1tok_drop_ft": 0.046, "baseline_ft": 0.934},
    # Two-digit "pairs" proxies (label needs two digits in two places), tried for the 1-token check: same recipe
    # and code path, one thread, on a shared 2-core CPU with 5-7 other runnable processes (seconds not
    # comparable to the idle 464 s above). Neither learned to 85% in 900 steps, and the 1-token config still
    # lost only ~3 points, so the code was removed.
    {"design": "rejected, code removed: pairs v1 (two digits, label = the larger): rule max, digits 22-28 px "
               "(0.4-0.5 of the canvas, one per half), 0-2 fragments (2x2-4x4 crops), ink 0.3-0.6", "steps": 900, "batch": 64, "lr": 5e-4, "warmup": 0.2, "train_seconds": 2846,
     "val_top1": 0.558, "loss_by_step": {"250": 1.93, "464": 1.57, "648": 1.39, "877": 1.24},
     "topk_zs": 0.550, "random_zs": 0.285, "topk_ft": 0.546, "random_ft": 0.321, "1tok_zs": 0.526,
     "1tok_ft": 0.526, "1tok_drop_zs": 0.032, "1tok_drop_ft": 0.032, "baseline_ft": 0.554,
     "note": "learns 2-3x slower than cluttered (loss at the label prior, 2.08 nats, until step ~250); the 1-token "
             "config loses only 3 points, zero-shot too"},
    {"design": "rejected, code removed: pairs, rule sum ((a + b) mod 10), digits 22-28 px, 0-2 fragments", "steps": 900, "batch": 64,
     "lr": 5e-4, "warmup": 0.2, "note": "stopped at step 64 to give the CPU to the other runs (loss 2.37 at the "
                                        "10-class prior); the max rule already learned too slowly"},
    {"design": "rejected, code removed: pairs, rule max, digits fixed at 28 px (0.5: each fills its half across the split, jitter along "
               "the other axis only), no fragments", "steps": 900, "batch": 64, "lr": 5e-4, "warmup": 0.2,
     "train_seconds": 2558, "val_top1": 0.634, "loss_by_step": {"250": 2.0, "465": 1.4, "650": 1.15, "890": 0.95},
     "topk_zs": 0.595, "random_zs": 0.320, "topk_ft": 0.617, "random_ft": 0.337, "1tok_zs": 0.569,
     "1tok_ft": 0.607, "1tok_drop_zs": 0.065, "1tok_drop_ft": 0.027, "baseline_ft": 0.634,
     "note": "learns a little faster than v1, still far from 85% at 900 steps; the 1-token config again loses "
             "only 3 points after the fine-tune: two digits do not keep the class token from having the label "
             "after block 4"},
    # Why the 1-token check fails on this proxy: the task needs no more than 4 blocks. A 4-block deit_t (width 192,
    # 49 patches) trained with the default recipe (800 steps, bf16 on an AMX CPU, seed 0; /tmp/depth4.py: ProxyConfig(
    # model_kwargs={"depth": 4}) through proxy_backbone) reaches the 12-block model's accuracy, so after 4 full
    # blocks the class token can already hold the label, and 40 fine-tune steps teach it to.
    {"design": "diagnostic: default cluttered proxy, depth 4 instead of 12", "steps": 800, "batch": 64, "lr": 5e-4,
     "warmup": 0.2, "amp": "bf16", "val_top1": 0.90875, "n_val": 4000,
     "note": "equal to the 12-block model (0.896-0.906): the task is shallow, so keeping 1 token after block 4 "
             "cannot cost 20 points after a fine-tune; a proxy that meets acceptance 1d needs a task a 4-block "
             "model cannot learn in the budget while a 12-block one can"},
    # Two designs built to need depth (scratch scripts on the idle machine, bf16, seed 0, the default recipe's lr
    # and warm-up, val = 2,000 fixed images from a second seed; the configs applied with tpsexplore.reduce.apply
    # and fine-tuned 40 steps with the search's defaults; 1tok on 64 patches keeps 1/64 after block 4).
    {"design": "rejected, code removed: pointer (two hops of routing): 5 digits, 16-20 px, no fragments, in the "
               "4 corners and the centre; label = the digit in the corner the centre digit names (mod 4)",
     "steps": 800, "batch": 64, "lr": 5e-4, "warmup": 0.2, "train_seconds": 323,
     "loss_by_step": {"250": 2.27, "550": 2.11, "750": 2.05}, "val_top1": 0.299,
     "note": "loss barely below the 10-class prior (2.30): at 30% it reads a corner digit, not the pointer"},
    {"design": "diagnostic: random hierarchy model (Cagnetta et al.): 64 px canvas, one 8x8 random binary leaf "
               "pattern per patch, a quadtree of depth 3 (10 classes, 8 symbols per level, 2 synonymous "
               "productions each), so the class exists only after 3 levels of 4-way composition", "steps": 800,
     "batch": 64, "lr": 5e-4, "warmup": 0.2, "train_seconds": 380, "val_top1": 0.608, "topk_zs": 0.451,
     "random_zs": 0.140, "topk_ft": 0.600, "random_ft": 0.252, "1tok_zs": 0.520, "1tok_ft": 0.605,
     "note": "learns late (loss 1.05 at step 750); the 1-token config loses nothing after the fine-tune"},
    {"design": "diagnostic: the same random hierarchy model, trained to convergence", "steps": 1600, "batch": 64,
     "lr": 5e-4, "warmup": 0.2, "train_seconds": 698, "val_top1": 1.0, "topk_zs": 0.909, "random_zs": 0.202,
     "topk_ft": 0.975, "random_ft": 0.361, "1tok_zs": 0.903, "1tok_ft": 0.987,
     "note": "even a task whose label needs 3 levels of composition is decoded into the class token within "
             "blocks 0-4 by a 12-block deit_t trained from scratch: 1 token after block 4 costs 1.3 points "
             "after the fine-tune. Depth that only ImageNet-scale features use is not reproduced by a task "
             "that trains from scratch in minutes"},
]


def one_token_config(seed: int, depth: int, num_patches: int) -> ReductionConfig:
    """Top-K keeping 20 of 49 tokens at block 3 and 1 patch token at block 4 (checked on the schedule)."""
    cfg = ReductionConfig("topk", locations=(3, ONE_TOKEN_BLOCK), keep_ratios=(0.408, 0.05), seed=seed)
    sched = token_schedule(cfg, num_patches, 1, depth)
    last = sched.stages[-1]
    if (last.block, last.after) != (ONE_TOKEN_BLOCK, 1):
        raise ValueError(f"keep_ratios: {cfg.keep_ratios} keep {last.after} patch tokens after block {last.block}; "
                         f"the check needs exactly 1 after block {ONE_TOKEN_BLOCK}")
    return cfg


def accuracy_record(acc: Accuracy) -> dict[str, Any]:
    lo, hi = acc.interval
    return {"top1": acc.value, "n": acc.n, "correct": acc.correct, "ci95": [lo, hi], "ci_method": "wilson"}


def compare(a: Accuracy, b: Accuracy, name_a: str, name_b: str) -> dict[str, Any]:
    diff = paired_difference(a, b)
    test = mcnemar(a, b)
    return {"a": name_a, "b": name_b, "difference": diff.difference, "ci95": [diff.low, diff.high],
            "ci_method": "newcombe", "only_a": test.only_a, "only_b": test.only_b, "discordant": test.discordant,
            "mcnemar_p": test.p_value, "test": "exact McNemar (two-sided binomial on the discordant images)"}


def run_config(task: Task, name: str, cand: Any, study_seed: int, steps: int,
               depth: int) -> tuple[dict[str, Any], Accuracy, Accuracy]:
    """The search's trial path for one config: build, apply, zero-shot eval, fine-tune, eval."""
    model = task.new_model()
    seed = config_seed(cand, study_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as run_trial: learned predictors are initialised from the global RNG
        apply(model, cand.config)
    t0 = time.perf_counter()
    zs = task.evaluate(model)
    t_zs = time.perf_counter() - t0
    stats = task.finetune(model, steps, seed=seed)
    t0 = time.perf_counter()
    ft = task.evaluate(model)
    t_ft = time.perf_counter() - t0
    sched = token_schedule(cand.config, task.geometry.num_patches, task.geometry.num_prefix, depth) \
        if cand.config.method != "none" else None
    rec = {
        "name": name,
        "variant": cand.variant,
        "label": cand.config.label,
        "config": cand.config.to_dict(),
        "gmacs": cand.gmacs,
        "fraction_of_baseline": cand.fraction,
        "seed": seed,
        "tokens_per_block": [list(t) for t in sched.blocks] if sched is not None else None,
        "zero_shot": accuracy_record(zs["accuracy"]),
        "finetuned": accuracy_record(ft["accuracy"]),
        "finetune": stats,
        "eval_seconds": [t_zs, t_ft],
    }
    print(f"  {name:10s} {cand.config.label:32s} {cand.fraction:.3f}x  zero-shot {zs['accuracy']}  "
          f"fine-tuned {ft['accuracy']}", flush=True)
    return rec, zs["accuracy"], ft["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--proxy", nargs="*", default=[], metavar="KEY=VALUE",
                    help="ProxyConfig overrides for design runs, e.g. steps=300 lr=1e-3 (values parsed as JSON)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "proxy_discrimination.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    proxy = {}
    for item in args.proxy:
        key, _, value = item.partition("=")
        proxy[key] = json.loads(value)
    settings = build_settings({}, {"backbone": "deit_t", "budget": args.budget, "seed": args.seed, "device": "cpu",
                                   "proxy": proxy or None})
    device = torch.device("cpu")
    task = Task(settings, device)
    t0 = time.perf_counter()
    task.prepare(progress=True)
    prepare_s = time.perf_counter() - t0
    from tpsexplore.measure.train import proxy_backbone

    _, winfo = proxy_backbone(settings.backbone, seed=settings.seed, progress=False, cfg=task.proxy_cfg)
    depth = task.geometry.depth
    space = SearchSpace(task.geometry, settings.budget, resolve_variants(settings.methods), settings.max_stages,
                        settings.space, settings.seed)
    defaults = {p["method"]: space.from_params(p) for p in space.default_params()}
    cands = {
        "baseline": space.baseline(),
        "topk": defaults["topk"],
        "random": defaults["random"],
        "topk_1tok": space.candidate(one_token_config(settings.seed, depth, task.geometry.num_patches), "topk",
                                     None, "1 patch token after block 4"),
    }
    print(f"proxy: {task.data_description}; val {len(task.val_set)} images; {settings.finetune_steps} fine-tune "
          f"steps per config", flush=True)
    records, zs, ft = {}, {}, {}
    for name, cand in cands.items():
        records[name], zs[name], ft[name] = run_config(task, name, cand, settings.seed, settings.finetune_steps,
                                                       depth)
    comparisons = {
        "topk_vs_random_zero_shot": compare(zs["topk"], zs["random"], "topk", "random"),
        "topk_vs_random_finetuned": compare(ft["topk"], ft["random"], "topk", "random"),
        "baseline_vs_topk_1tok_finetuned": compare(ft["baseline"], ft["topk_1tok"], "baseline (fine-tuned)",
                                                   "topk_1tok"),
        "baseline_zero_shot_vs_topk_1tok_finetuned": compare(zs["baseline"], ft["topk_1tok"], "baseline (unreduced)",
                                                             "topk_1tok"),
    }
    n_val = len(task.val_set)
    c1 = comparisons["topk_vs_random_zero_shot"]
    c2 = comparisons["topk_vs_random_finetuned"]
    c3 = comparisons["baseline_vs_topk_1tok_finetuned"]
    c4 = comparisons["baseline_zero_shot_vs_topk_1tok_finetuned"]
    checks = {
        "val_images_at_least_4000": {"value": n_val, "pass": n_val >= MIN_VAL_IMAGES},
        "baseline_top1_at_least_0.85": {"value": zs["baseline"].value,
                                        "pass": zs["baseline"].value >= MIN_BASELINE_TOP1},
        "random_below_topk_zero_shot_p_below_0.01": {
            "difference": c1["difference"], "p": c1["mcnemar_p"],
            "pass": c1["difference"] > 0 and c1["mcnemar_p"] < MAX_P},
        "random_below_topk_finetuned_p_below_0.01": {
            "difference": c2["difference"], "p": c2["mcnemar_p"],
            "pass": c2["difference"] > 0 and c2["mcnemar_p"] < MAX_P},
        "topk_1tok_loses_at_least_20_points_finetuned": {
            "drop_vs_finetuned_baseline": c3["difference"], "drop_vs_unreduced_baseline": c4["difference"],
            "pass": min(c3["difference"], c4["difference"]) >= MIN_ONE_TOKEN_DROP},
    }
    doc = {
        "what": "does the default proxy tell token-reduction methods apart (issue 9, acceptance 1)",
        "code_path": "tpsexplore.search: build_settings, Task.prepare/new_model/evaluate/finetune, "
                     "SearchSpace.default_params/from_params, objective.config_seed",
        "settings": {"backbone": settings.backbone, "budget": settings.budget, "seed": settings.seed,
                     "finetune_steps": settings.finetune_steps, "finetune": task.finetune_kwargs,
                     "device": str(device), "torch_threads": torch.get_num_threads()},
        "data": task.data_info,
        "data_description": task.data_description,
        "eval_set": task.eval_set,
        "pretraining": {k: winfo.get(k) for k in ("val_top1", "val_top5", "n_val", "val_correct", "steps", "epochs",
                                                  "lr", "train_seconds", "checkpoint", "proxy_config")},
        "pretraining_cache": task.weights_info.get("cache"),
        "prepare_seconds": prepare_s,
        "configs": records,
        "comparisons": comparisons,
        "checks": checks,
        "all_pass": all(c["pass"] for c in checks.values()),
        "design_history": DESIGN_HISTORY,
        "loadavg_end": list(os.getloadavg()),
        "environment": environment_info("cpu"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    for name, c in checks.items():
        print(f"{'PASS' if c['pass'] else 'FAIL'} {name}: {json.dumps({k: v for k, v in c.items() if k != 'pass'})}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
