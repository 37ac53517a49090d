"""`tpsexplore report [STUDY or DB]`: the Pareto-front report of a study (HTML, Markdown, CSV, PNG + SVG figures).

    tpsexplore report runs/deit_t_budget035              # writes runs/deit_t_budget035/report/
    tpsexplore report runs/deit_t_budget035/results.db -o /tmp/report
    tpsexplore report                                     # the newest study under ./runs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", nargs="?", metavar="STUDY",
                        help="a study directory (DIR/NAME written by `tpsexplore search`), its results.db, or a "
                             "database URL; default: the newest study under ./runs")
    parser.add_argument("--study-dir", dest="study_dir", metavar="DIR", help="the same as STUDY")
    parser.add_argument("-o", "--out", metavar="DIR", help="output folder (default STUDY/report)")
    parser.add_argument("--study-name", dest="study_name", metavar="NAME",
                        help="which study, when the database holds several")
    parser.add_argument("--no-keep-maps", dest="keep_maps", action="store_false",
                        help="skip the token-keep maps (they rebuild a few models)")
    parser.add_argument("--images", type=int, default=3, metavar="N", help="images in the keep maps (default 3)")
    parser.add_argument("--configs", type=int, default=3, metavar="N",
                        help="best configs in the keep maps (default 3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def newest_study(root: Path = Path("runs")) -> Path:
    """The study directory under ``root`` whose results.db changed last."""
    from .frame import DB_NAME  # here, not at the top: `tpsexplore report --help` must not load pandas

    if not root.is_dir():
        raise FileNotFoundError(f"study: no STUDY given and {str(root)!r} does not exist; give a study directory "
                                "or results database")
    dbs = sorted(root.glob(f"*/{DB_NAME}"), key=lambda p: p.stat().st_mtime)
    if not dbs:
        raise FileNotFoundError(f"study: no STUDY given and no {str(root)}/*/{DB_NAME} exists; give a study "
                                "directory or results database")
    return dbs[-1].parent


def run(args: argparse.Namespace) -> int:
    from .build import build_report

    if args.images < 1 or args.configs < 1:
        raise ValueError(f"images: --images {args.images} and --configs {args.configs} must be >= 1")
    if args.study and args.study_dir and args.study != args.study_dir:
        raise ValueError(f"study: give STUDY or --study-dir, not both ({args.study!r}, {args.study_dir!r})")
    study = args.study or args.study_dir or str(newest_study())
    rep = build_report(study, args.out, study_name=args.study_name, keep_maps=args.keep_maps,
                       n_images=args.images, n_configs=args.configs, progress=not args.quiet)
    print(f"report of study {rep.study.name!r}: {rep.html}")
    print(f"  {len(rep.figures)} figures ({', '.join(f.name for f in rep.figures)}) as PNG and SVG in "
          f"{rep.out / 'figures'}")
    print(f"  also {rep.markdown.name}, {rep.csv.name}, pareto.csv; {len(rep.pareto)} Pareto-optimal config(s)")
    for name, why in rep.skipped:
        print(f"  skipped {name}: {why}", file=sys.stderr)
    return 0
