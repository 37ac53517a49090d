"""How long `tpsexplore --help` and each subcommand's ``--help`` take, each in a fresh process.

    python benchmarks/cli_help.py [--runs 7] [--out benchmarks/results/cli_help.json]

Runs the installed ``tpsexplore`` script beside this interpreter (``python -m tpsexplore.cli`` when there is
none) ``--runs`` times per command, wall clock from spawn to exit, and writes the median, min and max of each
to JSON, with the bare interpreter's start-up for scale and the heavy modules that building the parser
loads (the goal: none, and every ``--help`` under 1 s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "optuna", "pandas", "seaborn", "sqlalchemy", "matplotlib", "numpy")
GOAL_S = 1.0


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.decode()[-500:]}")
    return dt


def _stats(times: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "runs": len(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="fresh processes per command (median of these; >= 5)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli_help.json"))
    args = ap.parse_args(argv)
    if args.runs < 5:
        ap.error("--runs: at least 5")
    sys.path.insert(0, str(ROOT))
    from tpsexplore.cli import COMMANDS  # light: this is what is measured

    script = Path(sys.executable).with_name("tpsexplore")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "tpsexplore.cli"]
    probe = ("import sys, tpsexplore.cli as c; c.build_parser(); "
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                            check=True).stdout.strip()
    results = {"python -c pass (interpreter start-up)": _stats([_time([sys.executable, "-c", "pass"])
                                                                for _ in range(args.runs)])}
    for cmd in ([], *([name] for name in COMMANDS)):
        line = [*base, *cmd, "--help"]
        name = " ".join(["tpsexplore", *cmd, "--help"])
        _time(line)  # one warm-up run: the first spawn after a change also writes .pyc files
        results[name] = _stats([_time(line) for _ in range(args.runs)])
        print(f"{name:<32} median {results[name]['median_s']:.3f} s", file=sys.stderr)
    helps = {k: v for k, v in results.items() if k.startswith("tpsexplore")}
    out = {
        "benchmark": "cli_help",
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(base),
        "goal": f"every --help under {GOAL_S} s (median of {args.runs} fresh processes)",
        "meets_goal": all(v["median_s"] < GOAL_S for v in helps.values()),
        "slowest_median_s": max(v["median_s"] for v in helps.values()),
        "heavy_modules_loaded_by_parser": [m for m in loaded.split(",") if m],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1m": round(os.getloadavg()[0], 2)},
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}: slowest median {out['slowest_median_s']:.3f} s, goal met: {out['meets_goal']}",
          file=sys.stderr)
    return 0 if out["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
