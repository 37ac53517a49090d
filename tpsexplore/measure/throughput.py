"""Inference throughput of a model over batch sizes and precisions: one protocol for GPU and CPU.

Protocol (methods-spec section 6 and pitfall 17; the repos disagree, so it is fixed here and recorded):

* synthetic input (``torch.randn`` with a fixed seed) created on the device before timing; the model is moved
  to the device, put in eval mode (its training flag is restored afterwards) and run under
  ``torch.inference_mode``; bf16/fp16 use ``torch.autocast`` on the device type (CPU included), entered once
  around warm-up and timing so weight casts are cached as a deployed half-precision model would have them;
* warm-up: at least ``warmup_iters`` iterations AND at least ``warmup_s`` seconds of wall time;
* timing: ``windows`` windows of at least ``window_s`` seconds each. A window synchronizes, starts the timer
  (a CUDA event on GPU, ``time.perf_counter`` on CPU), queues the number of iterations that the previous
  window (or the warm-up) says will fill ``window_s``, stops the timer (CUDA event) and synchronizes once.
  Should it come out short, more iterations are appended before it ends. No other host syncs happen;
* reported: median img/s over windows with min/max and quartiles, median time per batch (pipelined, i.e.
  window time / iterations), peak memory, NVML telemetry read while the last window is still running on the
  GPU, energy over all windows (joules per image), and the machine's contention (`Contention`: other
  runnable processes, CPU steal, torch threads; on GPU other processes, SM clock, throttle reasons), sampled
  between windows, never inside one, with a ``loaded`` verdict;
* pairs (`measure_pair`): both models are warmed up, then their windows alternate (baseline, model,
  baseline, ...), so a load change during the measurement slows both sides alike and the speed-up holds;
* CPU time: on CPU with one torch thread every window also records the thread's CPU seconds
  (``time.thread_time``: all the work runs on the calling thread then). Pair speed-ups are taken from those
  (``Speedup.basis`` "cpu_time"): when other processes share the cores, a window's wall time depends on how
  much of it the scheduler gave this process, which swings from window to window at batch-1 scale (a
  4 ms forward against ~3 ms time slices), while its CPU time stays the work done. Measured on a 2-core
  machine with two busy loops: the wall-time batch-1 speed-up of a 1.34x pair read 0.95-1.51x, the
  CPU-time one 1.29-1.37x. The raw img/s and ms stay wall-clock figures.

Peak memory: on GPU ``torch.cuda.max_memory_allocated`` after resetting the peak before the run (weights,
input and activations; allocator caching excluded). On CPU (Linux) the process's peak resident set size
(VmHWM) during the run, after resetting it through ``/proc/self/clear_refs``; it covers the whole process
(weights, libraries, interpreter). Where that reset is not possible it is ``resource.getrusage``'s lifetime
peak. ``ThroughputResult.peak_mem_source`` says which.

Failures never end a run: out of memory is recorded (status "oom") and the batch is halved until it fits or
reaches 1; a precision the device cannot run is status "unsupported"; anything else raised by the model is
status "error". The message is kept in ``error``.
"""
from __future__ import annotations

import contextlib
import gc
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..progressbar import progress_bar
from ..errors import failure_text
from .telemetry import Contention, ContentionMonitor, Telemetry, TelemetrySession

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATUSES = ("ok", "oom", "unsupported", "error")
TIMER_CUDA = "cuda_events"
TIMER_CPU = "perf_counter"
PEAK_CUDA = "cuda_max_memory_allocated"
PEAK_CPU_HWM = "cpu_process_peak_rss_reset"
PEAK_CPU_RUSAGE = "cpu_process_peak_rss_lifetime"
_OVERSHOOT = 1.05  # size windows 5% above window_s so that extending a short window is rare
_DTYPE_HINTS = ("half", "bfloat16", "float16", "dtype", "autocast")


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ThroughputConfig:
    """Knobs of the throughput protocol (see the module docstring); validated on construction.

    device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N". input_size: (C, H, W), by
    default read from the model (timm ``patch_embed``). oom_fallback: halve the batch after an OOM.
    progress: show a tqdm bar on stderr.
    """

    batch_sizes: tuple[int, ...] = (1, 64, 256)
    dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
    warmup_iters: int = 10
    warmup_s: float = 1.0
    window_s: float = 2.0
    windows: int = 5
    device: str = "auto"
    input_size: tuple[int, int, int] | None = None
    oom_fallback: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", _unique_tuple(self.batch_sizes, "batch_sizes", int))
        object.__setattr__(self, "dtypes", _unique_tuple(self.dtypes, "dtypes", str))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", _unique_tuple(self.input_size, "input_size", int, dedupe=False))
        self.validate()

    def validate(self) -> "ThroughputConfig":
        """Raise ValueError naming the first bad field."""
        if not self.batch_sizes:
            raise ValueError("batch_sizes: empty; give at least one batch size >= 1")
        for b in self.batch_sizes:
            if not _is_int(b) or b < 1:
                raise ValueError(f"batch_sizes: {b!r} is not an integer >= 1")
        if not self.dtypes:
            raise ValueError(f"dtypes: empty; allowed: {', '.join(DTYPES)}")
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"dtypes: {d!r} unknown; allowed: {', '.join(DTYPES)}")
        if not _is_int(self.warmup_iters) or self.warmup_iters < 0:
            raise ValueError(f"warmup_iters: {self.warmup_iters!r} is not an integer >= 0")
        if not _is_real(self.warmup_s) or self.warmup_s < 0:
            raise ValueError(f"warmup_s: {self.warmup_s!r} is not a finite number >= 0")
        if not _is_real(self.window_s) or self.window_s <= 0:
            raise ValueError(f"window_s: {self.window_s!r} is not a finite number > 0")
        if not _is_int(self.windows) or self.windows < 1:
            raise ValueError(f"windows: {self.windows!r} is not an integer >= 1")
        _parse_device(self.device)
        if self.input_size is not None and (
                len(self.input_size) != 3 or not all(_is_int(v) and v >= 1 for v in self.input_size)):
            raise ValueError(f"input_size: {self.input_size!r} is not (C, H, W) with integers >= 1")
        if not _is_int(self.seed):
            raise ValueError(f"seed: {self.seed!r} is not an integer")
        if not isinstance(self.oom_fallback, bool):
            raise ValueError(f"oom_fallback: {self.oom_fallback!r} is not a bool")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress: {self.progress!r} is not a bool")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["batch_sizes"], data["dtypes"] = list(self.batch_sizes), list(self.dtypes)
        data["input_size"] = list(self.input_size) if self.input_size is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ThroughputConfig":
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise ValueError(f"{key}: unknown throughput setting; allowed: {', '.join(known)}")
        return cls(**data)


def _unique_tuple(value: Any, name: str, scalar: type, dedupe: bool = True) -> tuple:
    """A single value or a sequence as a tuple (duplicates dropped, order kept)."""
    if isinstance(value, scalar):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name}: {value!r} is not a sequence")
    items = tuple(value)
    if not all(isinstance(v, (int, float, str)) for v in items):
        raise ValueError(f"{name}: {list(items)!r} holds values that are not numbers or strings")
    return tuple(dict.fromkeys(items)) if dedupe else items


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_device(spec: str | torch.device) -> torch.device | None:
    """torch.device for a device string; None for "auto". Raises ValueError for anything but cpu/cuda."""
    if isinstance(spec, str) and spec == "auto":
        return None
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {spec!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {spec!r} unsupported; allowed: auto, cpu, cuda, cuda:N")
    return dev


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch.device to measure on ("auto": cuda when available). ValueError if CUDA is asked for but absent."""
    dev = _parse_device(spec)
    if dev is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {str(spec)!r} requested but torch.cuda.is_available() is False; "
                             "allowed here: auto, cpu")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: {str(spec)!r} out of range; {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    return dev


# --------------------------------------------------------------------------------------------- results
@dataclass
class ThroughputResult:
    """One (model, batch size, dtype) measurement, or the record of why it could not be made.

    images_per_s is the median over windows; images_per_s_min/max and _q1/_q3 give the spread.
    latency_ms is the median over windows of window time / iterations (time per batch while pipelined).
    window_cpu_seconds: the calling thread's CPU seconds per window (CPU, one torch thread; else empty).
    batch_size is the batch actually run; requested_batch_size the one asked for (they differ after an OOM
    fallback). energy_j covers all timed windows; joules_per_image divides it by the images they processed.
    contention: how busy the machine was during the windows, with the ``loaded`` verdict (measured results).
    """

    label: str
    batch_size: int
    requested_batch_size: int
    dtype: str
    device: str
    status: str
    images_per_s: float | None = None
    images_per_s_min: float | None = None
    images_per_s_max: float | None = None
    images_per_s_q1: float | None = None
    images_per_s_q3: float | None = None
    latency_ms: float | None = None
    windows: int = 0
    window_iters: list[int] = field(default_factory=list)
    window_seconds: list[float] = field(default_factory=list)
    window_images_per_s: list[float] = field(default_factory=list)
    window_cpu_seconds: list[float] = field(default_factory=list)
    target_window_s: float = 0.0
    warmup_iters: int = 0
    warmup_s: float = 0.0
    peak_mem_bytes: int | None = None
    peak_mem_source: str | None = None
    energy_j: float | None = None
    joules_per_image: float | None = None
    threads: int = 0
    timer: str = ""
    autocast: bool = False
    input_shape: list[int] = field(default_factory=list)
    error: str | None = None
    telemetry: Telemetry | None = None
    contention: Contention | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def window_cpu_images_per_s(self) -> list[float]:
        """Images per CPU-second of every window (empty without CPU times)."""
        if len(self.window_cpu_seconds) != len(self.window_iters):
            return []
        return [n * self.batch_size / max(c, 1e-9) for n, c in zip(self.window_iters, self.window_cpu_seconds)]

    @property
    def images_per_s_iqr(self) -> float | None:
        if self.images_per_s_q1 is None or self.images_per_s_q3 is None:
            return None
        return self.images_per_s_q3 - self.images_per_s_q1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (telemetry nested as a dict)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ThroughputResult":
        """Rebuild from `to_dict()` output; keys this version does not know (newer records) are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("telemetry") is not None:
            kwargs["telemetry"] = Telemetry.from_dict(kwargs["telemetry"])
        if kwargs.get("contention") is not None:
            kwargs["contention"] = Contention.from_dict(kwargs["contention"])
        return cls(**kwargs)


@dataclass
class Speedup:
    """Throughput ratio model / baseline for one (dtype, requested batch size), at a batch both ran.

    speedup is the median of the window-pair ratios (`window_ratios`), not the ratio of the two medians: each
    model window is compared with the baseline windows right before and after it, so a load change during
    the cell moves both sides of every ratio alike. The ratios' min and max give the spread. basis: "cpu_time"
    when both sides have per-window CPU times (CPU, one torch thread: see the module docstring), else "wall".
    """

    dtype: str
    requested_batch_size: int
    batch_size: int | None
    baseline_images_per_s: float | None
    images_per_s: float | None
    speedup: float | None
    note: str | None = None
    window_ratios: list[float] = field(default_factory=list)
    basis: str = "wall"


@dataclass
class PairResult:
    """Baseline and model measured side by side in one process (see `measure_pair`)."""

    baseline: list[ThroughputResult]
    model: list[ThroughputResult]
    speedups: list[Speedup]

    def speedup(self, batch_size: int, dtype: str = "fp32") -> float | None:
        """The speed-up for a requested batch size and dtype (None if either side did not run)."""
        for s in self.speedups:
            if s.requested_batch_size == batch_size and s.dtype == dtype:
                return s.speedup
        raise KeyError(f"batch_size={batch_size}, dtype={dtype!r} was not measured")

    def cells(self) -> list[tuple[Speedup, ThroughputResult, ThroughputResult]]:
        """Per (dtype, requested batch): the speed-up and the baseline and model records it compares.

        After an OOM fallback a cell has several records per side (the failure, then the smaller batch, and
        the baseline again at the model's batch); this picks the compared ones, else each side's last try.
        """
        def pick(records: list[ThroughputResult], s: Speedup) -> ThroughputResult:
            cell = [r for r in records if r.dtype == s.dtype and r.requested_batch_size == s.requested_batch_size]
            return ([r for r in cell if r.ok and r.batch_size == s.batch_size] or cell)[-1]

        return [(s, pick(self.baseline, s), pick(self.model, s)) for s in self.speedups]

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": [r.to_dict() for r in self.baseline], "model": [r.to_dict() for r in self.model],
                "speedups": [asdict(s) for s in self.speedups]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PairResult":
        return cls(baseline=[ThroughputResult.from_dict(r) for r in data["baseline"]],
                   model=[ThroughputResult.from_dict(r) for r in data["model"]],
                   speedups=[Speedup(**s) for s in data["speedups"]])


# ------------------------------------------------------------------------------------- timing machinery
class _Clock:
    """Times queued work: sync then start, mark the end, read (one sync). CUDA events or perf_counter."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.name = TIMER_CUDA if self.cuda else TIMER_CPU
        self._start: Any = None
        self._end: Any = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _stamp(self) -> Any:
        """A recorded CUDA event (read later, no sync now) or the perf_counter time."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.sync()
        self._start = self._stamp()

    def mark(self) -> None:
        self._end = self._stamp()

    def elapsed_s(self) -> float:
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return self._end - self._start


class _PeakMemory:
    """Peak memory of one measurement (see the module docstring for what it means per device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source: str | None = None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = PEAK_CUDA
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            self.source = PEAK_CPU_HWM if _vmhwm_bytes() is not None else PEAK_CPU_RUSAGE
        except OSError:
            self.source = PEAK_CPU_RUSAGE

    def read(self) -> int | None:
        if self.source == PEAK_CUDA:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source == PEAK_CPU_HWM:
            value = _vmhwm_bytes()
            if value is not None:
                return value
            self.source = PEAK_CPU_RUSAGE
        try:
            import resource
        except ImportError:
            self.source = None
            return None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def _vmhwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _warm_up(run: Callable[[int], None], clock: _Clock, min_iters: int, min_s: float) -> tuple[int, float, float]:
    """Run >= min_iters iterations and >= min_s wall seconds (at least one); (iterations, seconds, s/iter)."""
    done, t0, chunk = 0, time.perf_counter(), max(1, min_iters)
    while True:
        clock.start()
        run(chunk)
        clock.mark()
        per_iter = max(clock.elapsed_s() / chunk, 1e-9)
        done += chunk
        wall = time.perf_counter() - t0
        if done >= min_iters and wall >= min_s:
            return done, wall, per_iter
        chunk = max(1, min_iters - done, math.ceil((min_s - wall) / per_iter))


def _autocast_check(device: torch.device, dtype: str) -> str | None:
    """Why autocast to ``dtype`` is not actually active here, else None (older torch builds silently disable it on CPU)."""
    if dtype == "fp32":
        return None
    try:
        enabled = torch.is_autocast_enabled(device.type)
        active = torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError, RuntimeError):
        return None
    if not enabled or active != DTYPES[dtype]:
        return f"{dtype}: autocast on {device.type} is not active for {DTYPES[dtype]} (got {active}, enabled={enabled})"
    return None


def _native_support(device: torch.device, dtype: str) -> str | None:
    """Why ``dtype`` cannot run natively on ``device``, else None (only CUDA bf16 is checked up front)."""
    if device.type == "cuda" and dtype == "bf16":
        with torch.cuda.device(device):
            try:
                supported = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:
                supported = torch.cuda.is_bf16_supported()
        if not supported:
            return f"bf16: {torch.cuda.get_device_name(device)} has no native bf16"
    return None


class _Unsupported(RuntimeError):
    """The requested precision cannot run on this device."""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def input_shape(model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one input: ``input_size`` if given, else from timm's ``patch_embed`` or ``pretrained_cfg``."""
    if input_size is not None:
        return tuple(int(v) for v in input_size)  # type: ignore[return-value]
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    chans = getattr(getattr(pe, "proj", None), "in_channels", None)
    if img is not None and chans is not None:
        h, w = (img, img) if isinstance(img, int) else img
        return int(chans), int(h), int(w)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(int(v) for v in cfg["input_size"])  # type: ignore[return-value]
    raise ValueError(f"input_size: cannot read it from {type(model).__name__}; "
                     "give ThroughputConfig(input_size=(C, H, W))")


# ------------------------------------------------------------------------------------------ measuring
@dataclass
class _Run:
    """What stays the same across the measurements of one call."""

    config: ThroughputConfig
    device: torch.device
    session: TelemetrySession
    monitor: ContentionMonitor


class _Side:
    """One model at one (batch, dtype): its input, the warm-up, then timed windows one at a time.

    `measure_throughput` times one side's windows back to back; `measure_pair` alternates the windows of
    the baseline and the model (ABAB...), so that a change of machine load hits both sides alike. Between
    windows (never inside one) the contention monitor takes a sample; ``spans`` keeps each window's
    (before, after) sample indices.
    """

    def __init__(self, model: nn.Module, result: ThroughputResult, ctx: _Run) -> None:
        self.model, self.result, self.ctx = model, result, ctx
        self.clock, self.peak = _Clock(ctx.device), _PeakMemory(ctx.device)
        self.meter = ctx.session.energy_meter()
        self.x: torch.Tensor | None = None
        self.per_iter = 0.0
        self.iters: list[int] = []
        self.secs: list[float] = []
        self.cpu_secs: list[float] | None = [] if ctx.device.type == "cpu" and torch.get_num_threads() == 1 else None
        self.spans: list[tuple[int, int]] = []
        self.energy: float | None = 0.0
        self.peaks: list[int] = []
        self.snap: Telemetry | None = None
        self.failed = False

    def run(self, n: int) -> None:
        model, x = self.model, self.x
        for _ in range(n):
            model(x)

    def _read_peak(self) -> None:
        value = self.peak.read()
        if value is not None:
            self.peaks.append(value)

    def start(self) -> None:
        """Input on the device and the warm-up (raises on OOM or model errors)."""
        cfg, r = self.ctx.config, self.result
        self.peak.reset()
        gen = torch.Generator(device=self.ctx.device).manual_seed(cfg.seed)
        self.x = torch.randn(r.input_shape, generator=gen, device=self.ctx.device)
        r.warmup_iters, r.warmup_s, self.per_iter = _warm_up(self.run, self.clock, cfg.warmup_iters, cfg.warmup_s)
        self._read_peak()

    def window(self, last: bool) -> None:
        """Time one window of >= window_s seconds (telemetry is read while the last one runs on the GPU)."""
        window_s = self.ctx.config.window_s
        self.peak.reset()
        self.clock.sync()
        self.meter.start()
        n = max(1, math.ceil(window_s / self.per_iter * _OVERSHOOT))
        cpu0 = time.thread_time()
        self.clock.start()
        self.run(n)
        self.clock.mark()
        if last:
            self.snap = self.ctx.session.snapshot()  # GPU still busy with the window: the device under load
        dt = self.clock.elapsed_s()
        while dt < window_s:  # estimate was off: append iterations to the same window
            extra = max(1, math.ceil((window_s - dt) / (dt / n) * _OVERSHOOT)) if dt > 0 else n
            self.run(extra)
            n += extra
            self.clock.mark()
            dt = self.clock.elapsed_s()
        if self.cpu_secs is not None:
            self.cpu_secs.append(time.thread_time() - cpu0)
        energy = self.meter.stop()
        self.energy = self.energy + energy if self.energy is not None and energy is not None else None
        self._read_peak()
        self.per_iter = max(dt / n, 1e-9)
        self.iters.append(n)
        self.secs.append(dt)

    def fail(self, exc: BaseException) -> None:
        _record_failure(self.result, exc, self.ctx)
        self.failed, self.x = True, None

    def finish(self) -> None:
        """Fill the result from the windows (median img/s, spread, latency, memory, energy, contention)."""
        r, iters, secs, batch = self.result, self.iters, self.secs, self.result.batch_size
        self.x = None
        if self.failed:
            return
        ips = [n * batch / dt for n, dt in zip(iters, secs)]
        q1, _, q3 = statistics.quantiles(ips, n=4, method="inclusive") if len(ips) > 1 else (ips[0],) * 3
        r.windows, r.window_iters, r.window_seconds, r.window_images_per_s = len(ips), iters, secs, ips
        r.window_cpu_seconds = list(self.cpu_secs or [])
        r.images_per_s = statistics.median(ips)
        r.images_per_s_min, r.images_per_s_max = min(ips), max(ips)
        r.images_per_s_q1, r.images_per_s_q3 = q1, q3
        r.latency_ms = statistics.median(dt / n * 1000.0 for n, dt in zip(iters, secs))
        r.peak_mem_bytes, r.peak_mem_source = (max(self.peaks) if self.peaks else None), self.peak.source
        telemetry = self.snap or self.ctx.session.snapshot()
        energy = self.energy if self.meter.method is not None else None
        telemetry.energy_j, telemetry.energy_method = energy, self.meter.method
        if self.meter.error and self.meter.method is None and telemetry.nvml_error is None:
            telemetry.nvml_error = f"energy: {self.meter.error}"
        r.telemetry = telemetry
        r.energy_j = energy
        r.joules_per_image = energy / (sum(iters) * batch) if energy is not None else None
        r.contention = self.ctx.monitor.summary(self.spans, threads=r.threads, telemetry=telemetry)


def _new_result(label: str, batch: int, requested: int, dtype: str, shape: tuple[int, int, int],
                ctx: _Run) -> ThroughputResult:
    return ThroughputResult(label=label, batch_size=batch, requested_batch_size=requested, dtype=dtype,
                            device=str(ctx.device), status="ok", target_window_s=float(ctx.config.window_s),
                            threads=torch.get_num_threads(), timer=_Clock(ctx.device).name,
                            autocast=dtype != "fp32", input_shape=[batch, *shape])


def _record_failure(result: ThroughputResult, exc: BaseException, ctx: _Run) -> None:
    """Status and one-line error of a failed measurement; its figures cleared, CUDA memory released."""
    msg = failure_text(exc)
    if isinstance(exc, _Unsupported):
        result.status = "unsupported"
    elif _is_oom(exc):
        result.status = "oom"
    elif result.dtype != "fp32" and any(h in msg.lower() for h in _DTYPE_HINTS):
        result.status = "unsupported"
    else:
        result.status = "error"
    result.error = str(exc) if isinstance(exc, _Unsupported) else msg
    _clear_stats(result)
    if result.telemetry is None:
        result.telemetry = ctx.session.snapshot()


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # the exception and its frames are gone here, so their tensors can be released
        torch.cuda.empty_cache()


def _clear_stats(result: ThroughputResult) -> None:
    for name in ("images_per_s", "images_per_s_min", "images_per_s_max", "images_per_s_q1", "images_per_s_q3",
                 "latency_ms", "energy_j", "joules_per_image", "peak_mem_bytes", "peak_mem_source", "contention"):
        setattr(result, name, None)
    result.windows, result.window_iters, result.window_seconds, result.window_images_per_s = 0, [], [], []
    result.window_cpu_seconds = []


@contextlib.contextmanager
def _precision(device: torch.device, dtype: str) -> Iterator[None]:
    """inference_mode and autocast to ``dtype`` (entered once per cell, so weight casts are cached)."""
    reason = _native_support(device, dtype)
    if reason is not None:
        raise _Unsupported(reason)
    with torch.inference_mode(), torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        reason = _autocast_check(device, dtype)
        if reason is not None:
            raise _Unsupported(reason)
        yield


def _start(model: nn.Module, start: int, requested: int, dtype: str, shape: tuple[int, int, int], label: str,
           ctx: _Run) -> tuple[list[ThroughputResult], _Side | None]:
    """Warm ``model`` up at ``start``; after an OOM halve the batch (when allowed) until it runs or reaches 1.

    Returns the failed attempts' records and the started side (None when every attempt failed).
    """
    failed, batch = [], start
    while True:
        side = _Side(model, _new_result(label, batch, requested, dtype, shape, ctx), ctx)
        try:
            side.start()
            return failed, side
        except Exception as exc:  # noqa: BLE001 - a failing configuration is recorded, the run goes on
            side.fail(exc)
        _release(ctx.device)
        failed.append(side.result)
        if side.result.status != "oom" or not ctx.config.oom_fallback or batch == 1:
            return failed, None
        batch = max(1, batch // 2)


def _time_windows(sides: Sequence[_Side], ctx: _Run) -> None:
    """Time every side's windows, alternating between the sides window by window, then fill their results."""
    before = ctx.monitor.sample()
    windows = ctx.config.windows
    for w in range(windows):
        for side in sides:
            if side.failed:
                continue
            try:
                side.window(last=w == windows - 1)
            except Exception as exc:  # noqa: BLE001 - recorded; the other side goes on
                side.fail(exc)
                _release(ctx.device)
                continue
            after = ctx.monitor.sample()
            side.spans.append((before, after))
            before = after
    for side in sides:
        side.finish()


def _unsupported_cell(exc: _Unsupported, labels: Sequence[tuple[str, tuple[int, int, int]]], batch: int,
                      dtype: str, ctx: _Run) -> list[ThroughputResult]:
    out = []
    for label, shape in labels:
        r = _new_result(label, batch, batch, dtype, shape, ctx)
        _record_failure(r, exc, ctx)
        out.append(r)
    return out


def _single_cell(model: nn.Module, batch: int, dtype: str, shape: tuple[int, int, int], label: str,
                 ctx: _Run) -> list[ThroughputResult]:
    """One (dtype, batch) of one model: the failed attempts, then the measured (or last failed) record."""
    try:
        with _precision(ctx.device, dtype):
            records, side = _start(model, batch, batch, dtype, shape, label, ctx)
            if side is not None:
                _time_windows([side], ctx)
                records.append(side.result)
    except _Unsupported as exc:
        return _unsupported_cell(exc, [(label, shape)], batch, dtype, ctx)
    return records


def _last_ok(results: Sequence[ThroughputResult]) -> ThroughputResult | None:
    return next((r for r in reversed(results) if r.ok), None)


@contextlib.contextmanager
def _prepared(models: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Models on ``device`` in eval mode (training flags restored after), CUDA device made current."""
    modes = [m.training for m in models]
    for m in models:
        m.to(device).eval()
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _grid(cfg: ThroughputConfig, label: str) -> Iterator[tuple[str, int]]:
    cells = [(d, b) for d in cfg.dtypes for b in cfg.batch_sizes]
    yield from progress_bar(cells, desc=f"throughput {label}", unit="cell", file=sys.stderr, disable=not cfg.progress)


def measure_throughput(model: nn.Module, config: ThroughputConfig | None = None, *,
                       label: str = "model") -> list[ThroughputResult]:
    """Measure ``model`` at every (dtype, batch size) of ``config``; one result per attempt, in grid order.

    After an OOM the list holds the "oom" record(s) followed by the result at the batch that fitted
    (``requested_batch_size`` ties them together). Never raises for OOM, unsupported dtypes or model errors.
    Every measured result carries the machine's `Contention` during its windows.
    """
    cfg = config or ThroughputConfig()
    device = resolve_device(cfg.device)
    shape = input_shape(model, cfg.input_size)
    results: list[ThroughputResult] = []
    with TelemetrySession(device) as session, _prepared([model], device):
        ctx = _Run(cfg, device, session, ContentionMonitor(device))
        for dtype, batch in _grid(cfg, label):
            results.extend(_single_cell(model, batch, dtype, shape, label, ctx))
    return results


def measure_pair(baseline_model: nn.Module, model: nn.Module, config: ThroughputConfig | None = None, *,
                 baseline_label: str = "baseline", label: str = "model") -> PairResult:
    """Measure a baseline and a (reduced) model right beside each other, for a speed-up from one run.

    For each (dtype, batch size) the baseline is warmed up first, then the model at the batch the baseline
    fitted; if the model then needs a smaller batch, the baseline is warmed up again at that batch, so every
    speed-up compares equal batches. Then their timed windows alternate (baseline, model, baseline, ...):
    a change of machine load during the cell hits both sides alike, so the ratio holds while the raw figures
    move (each result's ``contention`` says how loaded the machine was). Both models are on the device
    together for the whole call.
    """
    cfg = config or ThroughputConfig()
    device = resolve_device(cfg.device)
    shape_b, shape_m = input_shape(baseline_model, cfg.input_size), input_shape(model, cfg.input_size)
    base_all: list[ThroughputResult] = []
    model_all: list[ThroughputResult] = []
    speedups: list[Speedup] = []
    with TelemetrySession(device) as session, _prepared([baseline_model, model], device):
        ctx = _Run(cfg, device, session, ContentionMonitor(device))
        for dtype, batch in _grid(cfg, f"{baseline_label} vs {label}"):
            try:
                with _precision(device, dtype):
                    base, b = _start(baseline_model, batch, batch, dtype, shape_b, baseline_label, ctx)
                    mod, m = _start(model, b.result.batch_size if b else batch, batch, dtype, shape_m, label, ctx)
                    if b is not None and m is not None and m.result.batch_size < b.result.batch_size:
                        b.x = None  # its warm-up at the larger batch is not timed: compare at the model's batch
                        more, b = _start(baseline_model, m.result.batch_size, batch, dtype, shape_b,
                                         baseline_label, ctx)
                        base += more
                    _time_windows([s for s in (b, m) if s is not None], ctx)
                    base += [b.result] if b is not None else []
                    mod += [m.result] if m is not None else []
            except _Unsupported as exc:
                base, mod = (_unsupported_cell(exc, [(lbl, shp)], batch, dtype, ctx)
                             for lbl, shp in ((baseline_label, shape_b), (label, shape_m)))
            base_all += base
            model_all += mod
            speedups.append(_speedup(dtype, batch, _last_ok(base), _last_ok(mod), base, mod))
    return PairResult(baseline=base_all, model=model_all, speedups=speedups)


def _speedup(dtype: str, requested: int, b_ok: ThroughputResult | None, m_ok: ThroughputResult | None,
             base: list[ThroughputResult], mod: list[ThroughputResult]) -> Speedup:
    if b_ok is None or m_ok is None or b_ok.batch_size != m_ok.batch_size:
        failed = base[-1] if b_ok is None else mod[-1]
        side = "baseline" if b_ok is None else "model"
        note = (f"{side}: {failed.status}: {failed.error}" if failed.status != "ok"
                else "no common batch size")
        return Speedup(dtype, requested, None, b_ok.images_per_s if b_ok else None,
                       m_ok.images_per_s if m_ok else None, None, note)
    note = None if b_ok.batch_size == requested else f"batch {requested} did not fit; compared at {b_ok.batch_size}"
    b_cpu, m_cpu = b_ok.window_cpu_images_per_s, m_ok.window_cpu_images_per_s
    basis = "cpu_time" if b_cpu and m_cpu else "wall"
    ratios = (window_pair_ratios(b_cpu, m_cpu) if basis == "cpu_time"
              else window_pair_ratios(b_ok.window_images_per_s, m_ok.window_images_per_s))
    return Speedup(dtype, requested, b_ok.batch_size, b_ok.images_per_s, m_ok.images_per_s,
                   statistics.median(ratios) if ratios else m_ok.images_per_s / b_ok.images_per_s, note, ratios,
                   basis)


def window_pair_ratios(baseline: Sequence[float], model: Sequence[float]) -> list[float]:
    """model / baseline for every pair of adjacent windows of the interleaved run B0 M0 B1 M1 ... .

    Model window i is paired with baseline window i (just before it) and i + 1 (just after it), so that
    each ratio spans about two windows of machine time; 2n - 1 ratios for n windows a side. Empty when the
    windows do not interleave that way (different counts).
    """
    if not baseline or len(baseline) != len(model):
        return []
    before = [m / b for b, m in zip(baseline, model)]
    after = [m / b for b, m in zip(baseline[1:], model)]
    return [r for pair in zip(before, after + [None]) for r in pair if r is not None]
