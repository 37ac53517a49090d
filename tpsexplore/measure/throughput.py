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
  GPU, and energy over all windows (joules per image).

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
from tqdm import tqdm

from .telemetry import Telemetry, TelemetrySession, _one_line

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
    batch_size is the batch actually run; requested_batch_size the one asked for (they differ after an OOM
    fallback). energy_j covers all timed windows; joules_per_image divides it by the images they processed.
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

    @property
    def ok(self) -> bool:
        return self.status == "ok"

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
        return cls(**kwargs)


@dataclass
class Speedup:
    """Throughput ratio model / baseline for one (dtype, requested batch size), at a batch both ran."""

    dtype: str
    requested_batch_size: int
    batch_size: int | None
    baseline_images_per_s: float | None
    images_per_s: float | None
    speedup: float | None
    note: str | None = None


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


def _timed_windows(run: Callable[[int], None], clock: _Clock, windows: int, window_s: float, per_iter: float,
                   on_last_queued: Callable[[], None]) -> tuple[list[int], list[float]]:
    """Time ``windows`` windows of >= window_s seconds; (iterations, seconds) per window."""
    iters, secs = [], []
    for w in range(windows):
        n = max(1, math.ceil(window_s / per_iter * _OVERSHOOT))
        clock.start()
        run(n)
        clock.mark()
        if w == windows - 1:
            on_last_queued()  # GPU still busy with the window: telemetry sees the device under load
        dt = clock.elapsed_s()
        while dt < window_s:  # estimate was off: append iterations to the same window
            extra = max(1, math.ceil((window_s - dt) / (dt / n) * _OVERSHOOT)) if dt > 0 else n
            run(extra)
            n += extra
            clock.mark()
            dt = clock.elapsed_s()
        per_iter = max(dt / n, 1e-9)
        iters.append(n)
        secs.append(dt)
    return iters, secs


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


def _measure_one(model: nn.Module, batch: int, requested: int, dtype: str, shape: tuple[int, int, int],
                 label: str, ctx: _Run) -> ThroughputResult:
    cfg, device = ctx.config, ctx.device
    result = ThroughputResult(label=label, batch_size=batch, requested_batch_size=requested, dtype=dtype,
                              device=str(device), status="ok", target_window_s=float(cfg.window_s),
                              threads=torch.get_num_threads(), timer=_Clock(device).name,
                              autocast=dtype != "fp32", input_shape=[batch, *shape])
    reason = _native_support(device, dtype)
    if reason is not None:
        result.status, result.error, result.telemetry = "unsupported", reason, ctx.session.snapshot()
        return result
    try:
        _run_protocol(model, result, shape, ctx)
    except _Unsupported as exc:
        result.status, result.error = "unsupported", str(exc)
    except Exception as exc:  # noqa: BLE001 - a failing configuration is recorded, the run goes on
        msg = _one_line(exc)
        if _is_oom(exc):
            result.status = "oom"
        elif dtype != "fp32" and any(h in msg.lower() for h in _DTYPE_HINTS):
            result.status = "unsupported"
        else:
            result.status = "error"
        result.error = msg
    if result.status != "ok":
        _clear_stats(result)
        if device.type == "cuda":
            gc.collect()  # the exception and its frames are gone here, so their tensors can be released
            torch.cuda.empty_cache()
        if result.telemetry is None:
            result.telemetry = ctx.session.snapshot()
    return result


def _clear_stats(result: ThroughputResult) -> None:
    for name in ("images_per_s", "images_per_s_min", "images_per_s_max", "images_per_s_q1", "images_per_s_q3",
                 "latency_ms", "energy_j", "joules_per_image", "peak_mem_bytes", "peak_mem_source"):
        setattr(result, name, None)
    result.windows, result.window_iters, result.window_seconds, result.window_images_per_s = 0, [], [], []


def _run_protocol(model: nn.Module, result: ThroughputResult, shape: tuple[int, int, int], ctx: _Run) -> None:
    """Warm up and time one configuration, filling ``result`` in place."""
    cfg, device, batch = ctx.config, ctx.device, result.batch_size
    clock, peak = _Clock(device), _PeakMemory(device)
    peak.reset()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.randn((batch, *shape), generator=gen, device=device)
    snaps: list[Telemetry] = []

    def run(n: int) -> None:
        for _ in range(n):
            model(x)

    with torch.inference_mode(), torch.autocast(device.type, dtype=DTYPES[result.dtype], enabled=result.autocast):
        reason = _autocast_check(device, result.dtype)
        if reason is not None:
            raise _Unsupported(reason)
        result.warmup_iters, result.warmup_s, per_iter = _warm_up(run, clock, cfg.warmup_iters, cfg.warmup_s)
        meter = ctx.session.energy_meter()
        clock.sync()
        meter.start()
        iters, secs = _timed_windows(run, clock, cfg.windows, cfg.window_s, per_iter,
                                     lambda: snaps.append(ctx.session.snapshot()))
        energy = meter.stop()
    ips = [n * batch / dt for n, dt in zip(iters, secs)]
    q1, _, q3 = statistics.quantiles(ips, n=4, method="inclusive") if len(ips) > 1 else (ips[0],) * 3
    result.windows, result.window_iters, result.window_seconds, result.window_images_per_s = len(ips), iters, secs, ips
    result.images_per_s = statistics.median(ips)
    result.images_per_s_min, result.images_per_s_max = min(ips), max(ips)
    result.images_per_s_q1, result.images_per_s_q3 = q1, q3
    result.latency_ms = statistics.median(dt / n * 1000.0 for n, dt in zip(iters, secs))
    result.peak_mem_bytes, result.peak_mem_source = peak.read(), peak.source
    telemetry = snaps[-1] if snaps else ctx.session.snapshot()
    telemetry.energy_j, telemetry.energy_method = energy, meter.method
    if meter.error and meter.method is None and telemetry.nvml_error is None:
        telemetry.nvml_error = f"energy: {meter.error}"
    result.telemetry = telemetry
    result.energy_j = energy
    result.joules_per_image = energy / (sum(iters) * batch) if energy is not None else None


def _with_fallback(model: nn.Module, start: int, requested: int, dtype: str, shape: tuple[int, int, int],
                   label: str, ctx: _Run) -> list[ThroughputResult]:
    """Measure at ``start``; after an OOM halve the batch (when allowed) until it runs or reaches 1."""
    out, batch = [], start
    while True:
        out.append(_measure_one(model, batch, requested, dtype, shape, label, ctx))
        if out[-1].status != "oom" or not ctx.config.oom_fallback or batch == 1:
            return out
        batch = max(1, batch // 2)


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
    yield from tqdm(cells, desc=f"throughput {label}", file=sys.stderr, disable=not cfg.progress, leave=False)


def measure_throughput(model: nn.Module, config: ThroughputConfig | None = None, *,
                       label: str = "model") -> list[ThroughputResult]:
    """Measure ``model`` at every (dtype, batch size) of ``config``; one result per attempt, in grid order.

    After an OOM the list holds the "oom" record(s) followed by the result at the batch that fitted
    (``requested_batch_size`` ties them together). Never raises for OOM, unsupported dtypes or model errors.
    """
    cfg = config or ThroughputConfig()
    device = resolve_device(cfg.device)
    shape = input_shape(model, cfg.input_size)
    results: list[ThroughputResult] = []
    with TelemetrySession(device) as session, _prepared([model], device):
        ctx = _Run(cfg, device, session)
        for dtype, batch in _grid(cfg, label):
            results.extend(_with_fallback(model, batch, batch, dtype, shape, label, ctx))
    return results


def measure_pair(baseline_model: nn.Module, model: nn.Module, config: ThroughputConfig | None = None, *,
                 baseline_label: str = "baseline", label: str = "model") -> PairResult:
    """Measure a baseline and a (reduced) model right beside each other, for a speed-up from one run.

    For each (dtype, batch size) the baseline runs first, then the model, at the batch the baseline
    fitted; if the model then needs a smaller batch, the baseline is measured again at that batch, so
    every speed-up compares equal batches. Both models are on the device together for the whole call.
    """
    cfg = config or ThroughputConfig()
    device = resolve_device(cfg.device)
    shape_b, shape_m = input_shape(baseline_model, cfg.input_size), input_shape(model, cfg.input_size)
    base_all: list[ThroughputResult] = []
    model_all: list[ThroughputResult] = []
    speedups: list[Speedup] = []
    with TelemetrySession(device) as session, _prepared([baseline_model, model], device):
        ctx = _Run(cfg, device, session)
        for dtype, batch in _grid(cfg, f"{baseline_label} vs {label}"):
            base = _with_fallback(baseline_model, batch, batch, dtype, shape_b, baseline_label, ctx)
            b_ok = _last_ok(base)
            mod = _with_fallback(model, b_ok.batch_size if b_ok else batch, batch, dtype, shape_m, label, ctx)
            m_ok = _last_ok(mod)
            if b_ok and m_ok and m_ok.batch_size < b_ok.batch_size:
                base += _with_fallback(baseline_model, m_ok.batch_size, batch, dtype, shape_b, baseline_label, ctx)
                b_ok = _last_ok(base)
            base_all += base
            model_all += mod
            speedups.append(_speedup(dtype, batch, b_ok, m_ok, base, mod))
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
    return Speedup(dtype, requested, b_ok.batch_size, b_ok.images_per_s, m_ok.images_per_s,
                   m_ok.images_per_s / b_ok.images_per_s, note)
