"""What a running search shows: trial n of N, the current trial's state, the best feasible configs so far,
elapsed time and ETA; and, at the end, the Pareto front.

On a terminal a tqdm bar (stderr) carries n/N, elapsed, ETA and the running trials' phases; every finished
trial prints one line. Without a terminal (logs, tests) the same facts come as plain lines.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from optuna.trial import FrozenTrial, TrialState

from .backend import A_FINETUNED, A_INTERRUPTED, A_PHASE, A_ROLE, A_WEIGHTS, A_ZERO_SHOT, counted, end, info


@dataclass(frozen=True)
class FrontRow:
    number: int
    variant: str
    label: str
    accuracy: float
    zero_shot: float | None
    cost: float
    gmacs: float | None
    weights: str | None


def pareto_front(trials: list[FrozenTrial], maximize_cost: bool) -> list[FrontRow]:
    """Non-dominated feasible complete trials (accuracy up; cost down, or up for throughput), by cost."""
    rows = [t for t in trials if t.state == TrialState.COMPLETE and t.values and info(t, "feasible")]
    sign = -1.0 if maximize_cost else 1.0
    front = []
    for t in rows:
        a, c = t.values[0], sign * t.values[1]
        dominated = any((u.values[0] >= a and sign * u.values[1] <= c) and
                        (u.values[0] > a or sign * u.values[1] < c) for u in rows)
        if not dominated:
            front.append(t)
    front.sort(key=lambda t: sign * t.values[1])
    return [FrontRow(t.number, info(t, "variant", "?"), info(t, "label", "?"), t.values[0],
                     t.user_attrs.get(A_ZERO_SHOT), t.values[1], info(t, "gmacs"),
                     t.user_attrs.get(A_WEIGHTS)) for t in front]


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Fed with snapshots of the Optuna trials by the coordinator; prints what changed."""

    def __init__(self, total: int, enabled: bool = True, stream: IO[str] | None = None,
                 cost_name: str = "gflops", maximize_cost: bool = False, baseline_gmacs: float = 0.0,
                 status_every_s: float = 30.0) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.cost_name, self.maximize_cost = cost_name, maximize_cost
        self.baseline_gmacs = baseline_gmacs
        self.t0 = time.time()
        self.done_at_start: int | None = None
        self.seen_final: set[int] = set()
        self.seen_running: dict[int, str] = {}
        self.status_every_s = status_every_s
        self._last_status = 0.0
        self._bar = None
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if enabled and self.tty:
            from ..progressbar import progress_bar

            self._bar = progress_bar(total=total, desc="search", unit="trial", file=self.stream, leave=True)

    # ------------------------------------------------------------------ helpers
    def _cost_text(self, t: FrozenTrial) -> str:
        g = info(t, "gmacs")
        frac = f" ({g / self.baseline_gmacs:.2f}x)" if g is not None and self.baseline_gmacs else ""
        text = f"{g:.4f} GMACs{frac}" if g is not None else "? GMACs"
        if self.cost_name == "throughput" and t.values:
            text += f", {t.values[1]:.0f} img/s"
        elif self.cost_name == "latency" and t.values:
            text += f", {t.values[1]:.2f} ms"
        return text

    def _eta(self, finished: int) -> float | None:
        done_here = finished - (self.done_at_start or 0)
        if done_here <= 0:
            return None
        per = (time.time() - self.t0) / done_here
        return max(0.0, per * (self.total - finished))

    def _best(self, trials: list[FrozenTrial], n: int = 3) -> str:
        front = pareto_front(trials, self.maximize_cost)
        if not front:
            return "no feasible trial yet"
        best = sorted(front, key=lambda r: -r.accuracy)[:n]
        return "; ".join(f"#{r.number} {r.label} top1 {r.accuracy:.3f}" for r in best)

    def _print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    # ------------------------------------------------------------------ updates
    def update(self, trials: list[FrozenTrial]) -> None:
        finished = [t for t in trials if t.state.is_finished()]
        n_done = counted([t for t in finished])
        if self.done_at_start is None:
            self.done_at_start = n_done
            self.seen_final = {t.number for t in finished}
            if n_done:
                self._print(f"[search] resuming: {n_done} of {self.total} trials already done")
        for t in sorted(finished, key=lambda t: t.number):
            if t.number in self.seen_final:
                continue
            self.seen_final.add(t.number)
            self.seen_running.pop(t.number, None)
            self._print(self._finished_line(t, trials, n_done))
        running = [t for t in trials if t.state == TrialState.RUNNING]
        for t in running:
            phase = t.user_attrs.get(A_PHASE, "sampling")
            label = info(t, "label")
            key = f"{label}|{phase.split(' ')[0]}"
            if not self.tty and self.seen_running.get(t.number) != key and label:
                self.seen_running[t.number] = key
                self._print(f"[search] trial {t.number} ({n_done + 1} of {self.total}) {label}: {phase}")
        eta = self._eta(n_done)
        state = " | ".join(f"#{t.number} {info(t, 'label', '...')}: {t.user_attrs.get(A_PHASE, 'sampling')}"
                           for t in running) or "idle"
        if self._bar is not None:
            self._bar.n = min(n_done, self.total)
            self._bar.set_postfix_str(state[:120], refresh=False)
            self._bar.refresh()
        elif self.enabled and time.time() - self._last_status >= self.status_every_s:
            self._last_status = time.time()
            self._print(f"[search] {n_done}/{self.total} trials, elapsed {_fmt_time(time.time() - self.t0)}, "
                        f"ETA {_fmt_time(eta)}; running: {state}; best: {self._best(trials)}")

    def _finished_line(self, t: FrozenTrial, trials: list[FrozenTrial], n_done: int) -> str:
        outcome = end(t, "outcome") or t.state.name.lower()
        label = info(t, "label", "?")
        role = t.user_attrs.get(A_ROLE, "sampled")
        dur = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        head = f"[search] trial {t.number} {outcome:<10} {label} [{role}]"
        if t.state == TrialState.COMPLETE and t.values:
            zs = t.user_attrs.get(A_ZERO_SHOT)
            ft = t.user_attrs.get(A_FINETUNED)
            acc = f"top1 {t.values[0]:.3f}" + (f" (zero-shot {zs:.3f})" if zs is not None and ft is not None else "")
            body = f"{acc}, {self._cost_text(t)}"
            if not info(t, "feasible"):
                body += ", over budget (reference)"
        else:
            body = end(t, "reason", "")
            if t.state == TrialState.FAIL and t.user_attrs.get(A_INTERRUPTED):
                body = body or "interrupted"
        eta = self._eta(n_done)
        return (f"{head}: {body} [{_fmt_time(dur)}] | {n_done}/{self.total} done, elapsed "
                f"{_fmt_time(time.time() - self.t0)}, ETA {_fmt_time(eta)} | best feasible: {self._best(trials)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def front_table(rows: list[FrontRow], cost_name: str, baseline_gmacs: float,
                extra: dict[int, dict[str, Any]] | None = None) -> str:
    """The Pareto front as an aligned text table: top-1 in percent with its 95% interval (``extra[n]["accuracy"]``,
    an `Accuracy`; digits as the interval supports) and its exact McNemar comparison with the most accurate
    (``extra[n]["vs_best"]``), GMACs, the cost objective at the reference, the paired speed-up
    (``extra[n]["speedup"]``) and the weights file."""
    from ..stats import decimals_for
    from .recommend import accuracy_cell

    extra = extra or {}
    head = ["trial", "method", "config", "top-1 % [95% CI]", "vs best (McNemar)", "zero-shot %", "GMACs", "x base"]
    if cost_name == "throughput":
        head.append("img/s")
    elif cost_name == "latency":
        head.append("ms (bs1)")
    head += ["speed-up", "weights"]
    lines = [head]
    for r in rows:
        e = extra.get(r.number, {})
        acc = e.get("accuracy")
        d = decimals_for(acc.half_width) if acc is not None else 1
        row = [str(r.number), r.variant, r.label, accuracy_cell(acc, r.accuracy), e.get("vs_best") or "-",
               "-" if r.zero_shot is None else f"{100 * r.zero_shot:.{d}f}",
               "-" if r.gmacs is None else f"{r.gmacs:.4g}",
               "-" if r.gmacs is None or not baseline_gmacs else f"{r.gmacs / baseline_gmacs:.3f}"]
        if cost_name in ("throughput", "latency"):
            row.append(f"{r.cost:.4g}")
        sp = e.get("speedup")
        row += ["-" if sp is None else f"{sp:.2f}x", r.weights or "-"]
        lines.append(row)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
