"""`tpsexplore profile`: measure one config and print one table (and optionally write its JSON)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_data_weights_arguments, check_data_weights

#: error-message fields that are set by a flag of another name (`tpsexplore.cli` names the flag)
FIELD_FLAGS = {"keep_ratios": "keep"}
RUNTIMES = ("eager", "compile", "onnxruntime")  # tpsexplore.measure.profile.RUNTIMES (torch-free here)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="deit_t, deit_s, deit_b, vit_b16 or a timm ViT name")
    p.add_argument("--method", default="none", help="a registered method (see `tpsexplore methods`) or none")
    p.add_argument("--locations", type=_ints, default=(), help="0-based block indices, e.g. 3,6,9")
    p.add_argument("--keep", type=_floats, default=(), help="keep ratio(s): one, or one per location")
    p.add_argument("--treatment", default=None, help="drop, fuse or squeeze (default: the method's own)")
    p.add_argument("--r", type=int, default=0, help="ToMe: tokens merged per block")
    p.add_argument("--r-inflection", type=float, default=0.0, help="ToMe: (r, inflection) schedule")
    add_data_weights_arguments(p)  # the same as `tpsexplore search`
    p.add_argument("--finetune-steps", type=int, default=50)
    p.add_argument("--distill", action="store_true", help="distil from the unreduced model while fine-tuning")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--runtime", default="eager", choices=RUNTIMES,
                   help="what the speed is measured on, for the reduced model and the baseline alike: eager "
                   "PyTorch (default), compile (torch.compile fullgraph, inductor) or onnxruntime (each exported to "
                   "ONNX with a fixed batch, run by onnxruntime on the CPU, fp32)")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="default 1,64,256 on GPU, 1,64 on CPU")
    p.add_argument("--dtypes", default=None, help="default fp32,bf16,fp16 on GPU, fp32,bf16 on CPU; fp32 with "
                   "--runtime compile or onnxruntime")
    p.add_argument("--val-limit", type=int, default=None, help="evaluate on at most this many images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..reduce import ReductionConfig
    from .profile import ProfileConfig, format_profile, profile

    reduction = ReductionConfig(method=args.method, locations=args.locations, keep_ratios=args.keep,
                                treatment=args.treatment, r=args.r, r_inflection=args.r_inflection)
    weights = check_data_weights(args.data, args.labels, args.weights, args.checkpoint)
    if args.json:
        out = Path(args.json)
        if not out.parent.exists():
            raise FileNotFoundError(f"json: folder {str(out.parent)!r} does not exist")
    cfg = ProfileConfig(
        backbone=args.backbone, reduction=reduction, data=args.data, labels=args.labels,
        checkpoint=args.checkpoint, weights=weights,
        finetune_steps=args.finetune_steps, distill=args.distill, device=args.device,
        batch_sizes=args.batch_sizes, dtypes=tuple(args.dtypes.split(",")) if args.dtypes else None,
        val_limit=args.val_limit, seed=args.seed, progress=not args.quiet, runtime=args.runtime)
    result = profile(cfg)
    print(format_profile(result))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(args.json)
        print(f"  JSON written to {args.json}")
    return 0
