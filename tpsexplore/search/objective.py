"""One trial: sample -> analytic budget check -> build -> throughput -> zero-shot -> gate -> fine-tune -> eval.

Everything a trial measures is written onto the Optuna trial (user attributes, see `backend`), phase by
phase, so a trial that dies still shows what it had; the coordinating process mirrors it into the results
store. Where a trial ends:

* infeasible: the analytic count of the sampled config exceeds the budget. Nothing is built; the
  violated constraint is recorded with ``trial.set_constraint`` and the trial is told PRUNED (stop reason
  ``infeasible: ...``; results store state ``infeasible``). About a millisecond.
* pruned: the zero-shot gate (`gate_decision`) found that even an optimistic fine-tune could not lift the
  config onto the feasible front (Optuna cannot prune multi-objective trials through report/should_prune,
  so the search decides and records why).
* complete: fine-tuned and evaluated; values = (top-1, cost).
* failed: anything raised (OOM, NaN loss, ...) with the one-line reason; the study goes on.
"""
from __future__ import annotations

import math
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..reduce import apply
from ..stats import Accuracy
from .backend import (A_COST, A_END, A_ENVIRONMENT, A_FINETUNED, A_INFO, A_INTERRUPTED, A_PHASE, A_RECORD,
                      A_WEIGHTS, A_ZERO_SHOT, Heartbeat, info, role)
from .space import Candidate, SearchSpace
from .spec import GateSettings, SearchSettings


class TrialInterrupted(KeyboardInterrupt):
    """Raised inside a trial when the search was asked to stop (Ctrl-C)."""


# ----------------------------------------------------------------------------- the gate
@dataclass(frozen=True)
class GateDecision:
    go: bool
    reason: str
    optimistic: float | None = None


def gate_decision(trials: list[FrozenTrial], variant: str, zero_shot: float, cost: float, maximize_cost: bool,
                  settings: GateSettings, number: int | None = None) -> GateDecision:
    """Can a config with this zero-shot top-1 and cost still reach the feasible front after fine-tuning?

    Optimistic fine-tuned accuracy = zero-shot + gain_factor * (largest fine-tune gain seen: of this
    method once it has ``min_finetuned`` fine-tuned trials, else of all) + margin. The config is stopped
    only when a feasible fine-tuned trial beats that optimistic accuracy at a cost at least as good.
    """
    if not settings.enabled:
        return GateDecision(True, "gate disabled")
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.number != number
            and A_ZERO_SHOT in t.user_attrs and A_FINETUNED in t.user_attrs]
    if len(done) < settings.min_finetuned:
        return GateDecision(True, f"gate open: {len(done)} fine-tuned trials so far (< {settings.min_finetuned})")
    gains = [t.user_attrs[A_FINETUNED] - t.user_attrs[A_ZERO_SHOT] for t in done]
    own = [t.user_attrs[A_FINETUNED] - t.user_attrs[A_ZERO_SHOT] for t in done
           if info(t, "variant") == variant]
    basis = own if len(own) >= settings.min_finetuned else gains
    gain = max(0.0, max(basis))
    optimistic = zero_shot + settings.gain_factor * gain + settings.margin
    for t in done:
        if not info(t, "feasible") or t.values is None:
            continue
        acc, c = t.values[0], t.values[1]
        better_cost = c >= cost if maximize_cost else c <= cost
        if acc > optimistic and better_cost:
            return GateDecision(False, f"gate: zero-shot top-1 {zero_shot:.3f} + optimistic fine-tune gain "
                                       f"{optimistic - zero_shot:.3f} = {optimistic:.3f} < {acc:.3f} of trial "
                                       f"{t.number} ({info(t, 'label', '?')}) at an equal or better "
                                       "cost", optimistic)
    return GateDecision(True, f"gate passed: optimistic {optimistic:.3f} may reach the front", optimistic)


# ----------------------------------------------------------------------------- trial runner
@dataclass
class TrialContext:
    """What a worker needs to run trials (built once per worker process)."""

    settings: SearchSettings
    space: SearchSpace
    task: Any  # tpsexplore.search.task.Task
    study: optuna.Study
    weights_dir: Path
    environment: dict[str, Any]
    device: torch.device
    stop: Callable[[], bool] = lambda: False
    baseline_model: torch.nn.Module | None = None
    # the study's reference baseline (`drift.Reference` dict, measured once at study start): the throughput and
    # latency objectives are the paired speed-up times it; None: the raw figures (no reference measured)
    reference: dict[str, Any] | None = None
    # called with the trial right before a (feasible) trial's model is built: re-chooses and records the CPU
    # thread count (`runner.thread_hook`)
    before_build: Callable[[optuna.Trial], None] | None = None


class _Recorder:
    """Writes a trial's phase, measurements and durations onto the Optuna trial as it goes."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.measurements: list[dict[str, Any]] = []
        self.durations: dict[str, float] = {}
        self._t = time.perf_counter()
        self._phase = "start"

    def phase(self, name: str, write: bool = True) -> None:
        now = time.perf_counter()
        self.durations[self._phase] = self.durations.get(self._phase, 0.0) + now - self._t
        self._t, self._phase = now, name
        if write:
            self.trial.set_user_attr(A_PHASE, name)

    def progress(self, text: str) -> None:
        self.trial.set_user_attr(A_PHASE, text)

    def add(self, items: list[dict[str, Any]], flush: bool = True) -> None:
        self.measurements.extend(items)
        if flush:
            self.flush()

    def flush(self) -> None:
        now = time.perf_counter()
        durations = {**self.durations, self._phase: self.durations.get(self._phase, 0.0) + now - self._t}
        self.trial.set_user_attr(A_RECORD, {
            "measurements": self.measurements,
            "durations": {k: round(v, 4) for k, v in durations.items() if k != "start"}})

    def finish(self, outcome: str, reason: str | None) -> None:
        self.phase("done", write=False)
        self.flush()
        self.trial.set_user_attr(A_END, {"outcome": outcome, "reason": reason})


def check_candidate(trial: optuna.Trial, space: SearchSpace) -> Candidate:
    """Sample (or replay the baseline), record config + analytic cost + the budget constraint. No model."""
    cand = space.baseline() if role(trial) == "baseline" else space.suggest(trial)
    trial.set_constraint("budget", cand.constraint)
    trial.set_user_attr(A_INFO, {"config": cand.config.to_dict(), "label": cand.config.label,
                                 "variant": cand.variant, "gmacs": cand.gmacs, "feasible": cand.feasible,
                                 "constraint": cand.constraint, "fraction": cand.fraction})
    return cand


def config_seed(cand: Candidate, seed: int) -> int:
    """A seed derived from the study seed and the config itself (stable across processes and retries)."""
    return (zlib.crc32(cand.config.to_json().encode()) ^ (seed * 2_654_435_761)) % (2 ** 31)


def analytic_measurements(cand: Candidate) -> list[dict[str, Any]]:
    return [
        {"kind": "gmacs", "value": cand.gmacs, "unit": "GMACs", "fidelity": "analytic", "provenance": "analytic",
         "extra": {"fraction_of_baseline": cand.fraction, "budget": cand.budget,
                   "target_gmacs": cand.target_gmacs, "note": cand.note,
                   "tokens": list(cand.macs_parts.get("tokens", []))}},
        {"kind": "params", "value": float(cand.params), "unit": "count", "fidelity": "analytic",
         "provenance": "analytic"},
    ]


def run_trial(ctx: TrialContext, trial: optuna.Trial) -> tuple[str, list[float] | None]:
    """Evaluate one trial; returns (outcome, values) and leaves every record on the trial.

    The caller tells Optuna the state (complete/pruned/fail). Raises TrialInterrupted/KeyboardInterrupt
    after recording when the search is being stopped.
    """
    rec = _Recorder(trial)
    rec.phase("sampling", write=False)
    cand = check_candidate(trial, ctx.space)
    rec.add(analytic_measurements(cand), flush=False)
    if not cand.feasible and not cand.reference:
        reason = (f"infeasible: {cand.fraction:.3f} x baseline GFLOPs (analytic {cand.gmacs:.4f} GMACs) > budget "
                  f"{cand.budget:g}")
        rec.finish("infeasible", reason)
        return "infeasible", None
    s = ctx.settings
    if ctx.before_build is not None:
        ctx.before_build(trial)
    trial.set_user_attr(A_ENVIRONMENT, ctx.environment)
    model = None
    try:
        with Heartbeat(ctx.study._storage, trial._trial_id):
            rec.phase("build")
            model = ctx.task.new_model()
            seed = config_seed(cand, s.seed)  # the same config (a retry too) starts and trains the same way
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # learned predictors are initialised from the global RNG
                apply(model, cand.config)
            _check_stop(ctx)
            rec.phase("throughput")
            rec.add(_throughput(ctx, model))
            _check_stop(ctx)
            rec.phase("zero-shot eval")
            zs = ctx.task.evaluate(model, limit=s.gate.zero_shot_images or None)
            _check_finite("zero-shot accuracy", zs["top1"])
            rec.add(_accuracy(zs, "zero_shot"))
            trial.set_user_attr(A_ZERO_SHOT, zs["top1"])
            cost = _cost(s, cand, rec.measurements, ctx.reference)
            trial.set_user_attr(A_COST, cost)
            if s.finetune_steps == 0:
                rec.finish("complete", None)
                return "complete", [zs["top1"], cost]
            if role(trial) == "sampled" and cand.feasible:
                decision = gate_decision(ctx.study.get_trials(deepcopy=False), cand.variant, zs["top1"], cost,
                                         s.maximize_cost, s.gate, trial.number)
                if not decision.go:
                    rec.finish("pruned", decision.reason)
                    return "pruned", None
            _check_stop(ctx)
            rec.phase("fine-tune")
            steps = s.finetune_steps

            def on_step(step: int, loss: float) -> None:
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss: NaN/inf training loss at fine-tune step {step}")
                if step % max(1, steps // 8) == 0 or step == steps:
                    rec.progress(f"fine-tune {step}/{steps}")
                _check_stop(ctx)

            stats = ctx.task.finetune(model, steps, seed=seed, on_step=on_step)
            rec.phase("fine-tuned eval")
            ft = ctx.task.evaluate(model)
            _check_finite("fine-tuned accuracy", ft["top1"])
            rec.add(_accuracy(ft, "finetuned", extra={"steps": steps, **(stats or {})}))
            trial.set_user_attr(A_FINETUNED, ft["top1"])
            rec.phase("save weights")
            path = _save_weights(ctx, trial.number, model, cand)
            trial.set_user_attr(A_WEIGHTS, str(path))
            rec.finish("complete", None)
            return "complete", [ft["top1"], cost]
    finally:
        del model  # no gc.collect(): a full collection costs ~0.7 s per trial in a process this size
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def record_failure(trial: optuna.Trial, exc: BaseException, interrupted: bool, why: str | None = None) -> str:
    """Write why a trial failed onto it (one line + a short traceback); ``why`` names what stopped an
    interrupted trial (default Ctrl-C), e.g. 'coordinator 1234 exited' or 'terminated (SIGTERM)'."""
    if interrupted:
        reason = (f"interrupted: {why} during this trial; the config is re-queued" if why else
                  "interrupted: the search was stopped (Ctrl-C) during this trial; the config is re-queued")
    else:
        kind = "out of memory" if _is_oom(exc) else type(exc).__name__
        reason = f"error: {kind}: {' '.join(str(exc).split())[:400] or type(exc).__name__}"
    try:
        trial.set_user_attr(A_END, {"outcome": "failed", "reason": reason})
        if interrupted:
            trial.set_user_attr(A_INTERRUPTED, True)
        else:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            trial.set_user_attr("tpsx_traceback", tb[-4000:])
    except Exception:  # noqa: BLE001 - recording must never mask the original failure
        pass
    return reason


# ----------------------------------------------------------------------------- pieces
def _check_stop(ctx: TrialContext) -> None:
    if ctx.stop():
        raise TrialInterrupted()


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{name}: {value} is not finite")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _accuracy(result: dict[str, Any], fidelity: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Top-1 with n, correct, its 95% interval and per-image bits; top-5 with n, correct and interval."""
    acc: Accuracy = result["accuracy"]
    info = {k: v for k, v in result.items()
            if k not in ("top1", "top5", "n", "correct1", "correct5", "accuracy") and isinstance(v, (int, float, str))}
    info.update(extra or {})
    info = {k: v for k, v in info.items() if not (isinstance(v, float) and not math.isfinite(v))}
    top5 = Accuracy(int(result["correct5"]), acc.n, None, acc.eval_set)
    provenance = result.get("provenance", "proxy")
    return [{"kind": "accuracy_top1", "value": acc.value, "unit": "fraction", "fidelity": fidelity,
             "provenance": provenance, "extra": {**info, **acc.extra()}},
            {"kind": "accuracy_top5", "value": top5.value, "unit": "fraction", "fidelity": fidelity,
             "provenance": provenance, "extra": {**info, **top5.extra()}}]


def throughput_config(settings: SearchSettings, device: torch.device, min_windows: int = 1) -> Any:
    """The `ThroughputConfig` of a study's speed measurements (batch 1 too when latency is on)."""
    from ..measure.throughput import ThroughputConfig

    m = settings.measure
    gpu = device.type == "cuda"
    batches = (1, m.batch_size) if m.latency and m.batch_size != 1 else (m.batch_size,)
    return ThroughputConfig(batch_sizes=batches, dtypes=(m.dtype,), warmup_iters=2,
                            warmup_s=m.gpu_warmup_s if gpu else m.warmup_s,
                            window_s=m.gpu_window_s if gpu else m.window_s,
                            windows=max(min_windows, m.gpu_windows if gpu else m.windows),
                            device=str(device), progress=False)


def _throughput(ctx: TrialContext, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Reduced model and the unreduced baseline measured side by side (same process, batch, dtype).

    Their timed windows alternate (`measure_pair`); every throughput / latency row carries the machine's
    contention during its windows in ``extra["contention"]`` (with the ``loaded`` verdict), and every
    speed-up row says whether either side was ``loaded``.
    """
    from ..measure.throughput import measure_pair

    cfg = throughput_config(ctx.settings, ctx.device)
    baseline = ctx.baseline_model if ctx.baseline_model is not None else ctx.task.new_model()
    pair = measure_pair(baseline, model, cfg, baseline_label="baseline", label="reduced")
    out: list[dict[str, Any]] = []
    ok_model = {(r.requested_batch_size, r.dtype): r for r in pair.model if r.ok}
    ok_base = {(r.requested_batch_size, r.dtype): r for r in pair.baseline if r.ok}
    for sp in pair.speedups:
        key = (sp.requested_batch_size, sp.dtype)
        r, b = ok_model.get(key), ok_base.get(key)
        if r is None or b is None:
            continue
        common = {"batch_size": r.batch_size, "dtype": r.dtype, "device": r.device, "provenance": "measure_pair"}
        extra = {"windows": r.windows, "images_per_s_min": r.images_per_s_min, "images_per_s_max": r.images_per_s_max,
                 "threads": r.threads, "timer": r.timer, "contention": _contention(r)}
        b_extra = {"windows": b.windows, "images_per_s_min": b.images_per_s_min,
                   "images_per_s_max": b.images_per_s_max, "threads": b.threads, "contention": _contention(b)}
        loaded = bool(extra["contention"].get("loaded") or b_extra["contention"].get("loaded"))
        if r.batch_size == 1:
            out.append({"kind": "latency_ms", "value": r.latency_ms, "unit": "ms", **common, "extra": extra})
            out.append({"kind": "baseline_latency_ms", "value": b.latency_ms, "unit": "ms", **common,
                        "extra": b_extra})
        else:
            out.append({"kind": "throughput", "value": r.images_per_s, "unit": "img/s", **common, "extra": extra})
            out.append({"kind": "baseline_throughput", "value": b.images_per_s, "unit": "img/s", **common,
                        "extra": b_extra})
            if r.peak_mem_bytes is not None:
                out.append({"kind": "peak_mem_bytes", "value": float(r.peak_mem_bytes), "unit": "bytes", **common,
                            "extra": {"source": r.peak_mem_source}})
            if r.joules_per_image is not None:
                out.append({"kind": "joules_per_image", "value": r.joules_per_image, "unit": "J", **common})
        if sp.speedup is not None:
            out.append({"kind": "speedup", "value": sp.speedup, "unit": "x", **common,
                        "extra": {"baseline_images_per_s": sp.baseline_images_per_s, "note": sp.note,
                                  "loaded": loaded, "window_ratios": sp.window_ratios,
                                  "basis": sp.basis}})
    return out


def _contention(r: Any) -> dict[str, Any]:
    return r.contention.to_dict() if r.contention is not None else {"loaded": False, "source": "not measured"}


def _cost(s: SearchSettings, cand: Candidate, measurements: list[dict[str, Any]],
          reference: dict[str, Any] | None = None) -> float:
    """The second objective's value: analytic GMACs, or the paired speed against the study's reference.

    throughput: speed-up at the study's batch x the reference baseline's img/s; latency: the reference
    baseline's batch-1 ms / the batch-1 speed-up (`drift.paired_value`). Both stay put when the machine's
    load changes during a study, since the speed-up is measured beside the baseline. Without a reference
    (an old study, a bare `run_trial`) the raw measured img/s or ms is used.
    """
    if s.cost_objective == "gflops":
        return cand.gmacs
    from .drift import paired_value

    kind = "throughput" if s.cost_objective == "throughput" else "latency_ms"
    batch = s.measure.batch_size if kind == "throughput" else 1
    speedups = {m.get("batch_size"): float(m["value"]) for m in measurements if m["kind"] == "speedup"}
    speedup = speedups.get(batch)
    if speedup is None and batch != 1 and any(b != 1 for b in speedups):  # the batch did not fit: the largest that did
        speedup = speedups[max(b for b in speedups if b != 1)]
    raw = next((float(m["value"]) for m in measurements if m["kind"] == kind), None)
    if reference is not None and speedup is not None:
        value = paired_value(kind, speedup, reference)
        if value is not None:
            return value
    if raw is None:
        raise RuntimeError(f"{kind}: the throughput measurement failed, so the '{s.objectives}' objective has no "
                           "value")
    return raw


def _save_weights(ctx: TrialContext, number: int, model: torch.nn.Module, cand: Candidate) -> Path:
    """The trial's weights file of the study layout (fine-tuned weights, predictors included), written atomically."""
    from safetensors.torch import save

    from ..manifest import StudyLayout, atomic_write

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return atomic_write(StudyLayout(ctx.settings.study_dir).weights(number),
                        save(state, metadata={"trial": str(number), "study": ctx.settings.name,
                                              "backbone": ctx.settings.backbone, "config": cand.config.to_json()}))
