"""GPU telemetry through NVML (identity, clocks, power, temperature, throttle reasons, energy), CPU fallback.

Every throughput result carries one `Telemetry` record so that a number can be judged later: which GPU and
driver, at what clocks and temperature, whether the clocks were being held back, and how much energy the
timed windows used. NVML is optional: on CPU, or when NVML (``pynvml``, package nvidia-ml-py) is missing or
fails, the record still names the device, the torch thread count and the CPU model, and ``nvml_error`` says
why there is no GPU data. Nothing here raises because NVML is absent or a query is unsupported.

Contention (`ContentionMonitor`, `Contention`): a timing is only as good as the machine was quiet. Between
timed windows (never inside one) the monitor reads /proc/stat (runnable tasks, CPU ticks incl. steal) and
this process's own running threads and CPU time; per measurement it keeps the other processes' runnable
tasks per window (median, max), the steal fraction, the CPU time other processes used, the torch threads,
and on GPU the other processes on the device, the SM clock and the throttle reasons, with a ``loaded``
verdict (`contention_reasons`).
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

import torch

from ..errors import failure_text

# NVML clock event ("throttle") reason bits, as in nvml.h (nvmlClocksEventReason* / nvmlClocksThrottleReason*).
THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x0001, "gpu_idle"),
    (0x0002, "applications_clocks_setting"),
    (0x0004, "sw_power_cap"),
    (0x0008, "hw_slowdown"),
    (0x0010, "sync_boost"),
    (0x0020, "sw_thermal_slowdown"),
    (0x0040, "hw_thermal_slowdown"),
    (0x0080, "hw_power_brake_slowdown"),
    (0x0100, "display_clock_setting"),
    (0x0200, "board_limit"),
    (0x0400, "reliability"),
)
ENERGY_COUNTER = "nvml_total_energy_counter"
ENERGY_POWER_SAMPLES = "nvml_power_samples"


class _Record:
    """JSON round trip of a flat record dataclass: `to_dict`, and `from_dict` ignoring keys this version does
    not know (records written by a newer version)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Telemetry(_Record):
    """One snapshot of the device a measurement ran on (GPU fields are None without NVML).

    Clocks, temperature, power draw and throttle reasons are read while the last timed window is still
    queued on the GPU, so they describe the device under load. ``energy_j`` covers the timed windows
    (``energy_method`` says how it was obtained); ``unsupported`` lists the NVML queries the device refused.
    """

    device: str
    threads: int
    cpu_model: str
    name: str | None = None
    uuid: str | None = None
    driver_version: str | None = None
    cuda_driver_version: int | None = None
    power_limit_w: float | None = None
    power_draw_w: float | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    max_sm_clock_mhz: int | None = None
    temperature_c: int | None = None
    throttle_mask: int | None = None
    throttle_reasons: list[str] = field(default_factory=list)
    energy_j: float | None = None
    energy_method: str | None = None
    nvml_error: str | None = None
    unsupported: list[str] = field(default_factory=list)
    load_avg_1m: float | None = None  # system load when read: CPU timings on a busy host are not comparable
    gpu_processes: int | None = None  # other processes holding a context on this GPU (NVML)



def decode_throttle_reasons(mask: int) -> list[str]:
    """Names of the set bits of an NVML clock event reason mask (unknown bits as 'unknown_0x...')."""
    names = [name for bit, name in THROTTLE_REASONS if mask & bit]
    rest = mask & ~sum(bit for bit, _ in THROTTLE_REASONS)
    if rest:
        names.append(f"unknown_{rest:#x}")
    return names


def cpu_model_name() -> str:
    """The CPU model string (/proc/cpuinfo on Linux, sysctl on macOS, else platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5, check=False)
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class EnergyMeter:
    """GPU energy between `start()` and `stop()`.

    Uses NVML's total-energy counter (mJ since driver load, Volta and newer); where that is unsupported it
    samples the power draw in a background thread and integrates it (trapezoids). ``method`` is None and
    `stop()` returns None when neither works (or on CPU).
    """

    def __init__(self, nvml: Any = None, handle: Any = None, sample_interval_s: float = 0.02):
        self._nvml, self._handle, self._interval = nvml, handle, sample_interval_s
        self.method: str | None = None
        self.error: str | None = None
        self._e0_mj = 0
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._nvml is None:
            return
        try:
            self._e0_mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.method = ENERGY_COUNTER
            return
        except self._nvml.NVMLError as exc:
            self.error = f"total energy counter: {failure_text(exc)}"
        try:
            self._samples = [(time.perf_counter(), self._power_w())]
        except self._nvml.NVMLError as exc:
            self.error = f"{self.error}; power usage: {failure_text(exc)}"
            return
        self.method = ENERGY_POWER_SAMPLES
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="tpsexplore-power-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        if self.method == ENERGY_COUNTER:
            try:
                return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._e0_mj) / 1000.0
            except self._nvml.NVMLError as exc:
                self.error, self.method = f"total energy counter: {failure_text(exc)}", None
                return None
        if self.method == ENERGY_POWER_SAMPLES and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                self._samples.append((time.perf_counter(), self._power_w()))
            except self._nvml.NVMLError:
                pass
            pts = self._samples
            return sum((t1 - t0) * (p0 + p1) / 2.0 for (t0, p0), (t1, p1) in zip(pts, pts[1:]))
        return None

    def _power_w(self) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._samples.append((time.perf_counter(), self._power_w()))
            except self._nvml.NVMLError:
                return


class TelemetrySession:
    """NVML kept initialised for one measurement run on one device; use as a context manager.

    `snapshot()` returns a `Telemetry` record; `energy_meter()` a fresh `EnergyMeter`. On CPU or without
    NVML both still work (CPU record with ``nvml_error`` set, meter that measures nothing).
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cpu_model = cpu_model_name()
        self.nvml_error: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._initialised = False

    def __enter__(self) -> "TelemetrySession":
        if self.device.type != "cuda":
            self.nvml_error = f"device is {self.device.type}: NVML telemetry covers NVIDIA GPUs only"
            return self
        try:
            import pynvml
        except ImportError as exc:
            self.nvml_error = f"pynvml not importable (install nvidia-ml-py): {failure_text(exc)}"
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.nvml_error = f"nvmlInit failed: {failure_text(exc)}"
            return self
        self._initialised = True
        try:
            self._handle = _nvml_handle(pynvml, self.device.index or 0)
            self._nvml = pynvml
        except (pynvml.NVMLError, LookupError, RuntimeError) as exc:
            self.nvml_error = f"no NVML handle for {self.device}: {failure_text(exc)}"
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._initialised:
            import pynvml
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
            self._initialised = False
        self._nvml = self._handle = None

    def energy_meter(self) -> EnergyMeter:
        return EnergyMeter(self._nvml, self._handle)

    def snapshot(self) -> Telemetry:
        record = Telemetry(device=str(self.device), threads=torch.get_num_threads(), cpu_model=self.cpu_model,
                           nvml_error=self.nvml_error, load_avg_1m=_load_avg())
        if self.device.type == "cuda" and torch.cuda.is_available():
            record.name = torch.cuda.get_device_name(self.device)
        if self._nvml is None:
            return record
        nv, h = self._nvml, self._handle

        def query(key: str, fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except nv.NVMLError:
                record.unsupported.append(key)
                return None

        record.name = _text(query("name", lambda: nv.nvmlDeviceGetName(h)) or record.name)
        uuid = query("uuid", lambda: nv.nvmlDeviceGetUUID(h))
        record.uuid = _text(uuid) if uuid is not None else None
        driver = query("driver_version", nv.nvmlSystemGetDriverVersion)
        record.driver_version = _text(driver) if driver is not None else None
        record.cuda_driver_version = query("cuda_driver_version", nv.nvmlSystemGetCudaDriverVersion)
        limit_mw = query("power_limit_w", lambda: _first_supported(
            nv, (lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h), lambda: nv.nvmlDeviceGetPowerManagementLimit(h))))
        record.power_limit_w = limit_mw / 1000.0 if limit_mw is not None else None
        draw_mw = query("power_draw_w", lambda: nv.nvmlDeviceGetPowerUsage(h))
        record.power_draw_w = draw_mw / 1000.0 if draw_mw is not None else None
        record.sm_clock_mhz = query("sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
        record.mem_clock_mhz = query("mem_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM))
        record.max_sm_clock_mhz = query("max_sm_clock_mhz", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM))
        record.temperature_c = query("temperature_c", lambda: _first_supported(nv, (
            lambda: nv.nvmlDeviceGetTemperatureV(h, nv.NVML_TEMPERATURE_GPU),
            lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))))
        mask = query("throttle_reasons", lambda: _first_supported(nv, (
            lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h),
            lambda: nv.nvmlDeviceGetCurrentClocksThrottleReasons(h))))
        record.throttle_mask = mask
        record.throttle_reasons = decode_throttle_reasons(mask) if mask is not None else []
        record.gpu_processes = query("gpu_processes", lambda: other_gpu_processes(nv, h))
        return record


def read_telemetry(device: str | torch.device) -> Telemetry:
    """One telemetry snapshot of ``device`` (opens and closes NVML); never raises for missing NVML."""
    with TelemetrySession(device) as session:
        return session.snapshot()


def _first_supported(nv: Any, calls: tuple[Callable[[], Any], ...]) -> Any:
    """The first call that works (newer NVML entry points first, deprecated ones as fallback)."""
    error: BaseException | None = None
    for call in calls:
        try:
            return call()
        except (nv.NVMLError, AttributeError) as exc:  # AttributeError: binding too old for the entry point
            error = exc
    raise error if isinstance(error, nv.NVMLError) else nv.NVMLError(nv.NVML_ERROR_NOT_SUPPORTED)


def _nvml_handle(nv: Any, index: int) -> Any:
    """NVML handle of torch CUDA device ``index``, matched by UUID, then PCI bus id.

    NVML numbers devices physically while torch numbers them after CUDA_VISIBLE_DEVICES, so the index is
    used only when no remapping is in force.
    """
    props = torch.cuda.get_device_properties(index)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        for candidate in (uuid, f"GPU-{uuid}", f"MIG-{uuid}"):
            try:
                return nv.nvmlDeviceGetHandleByUUID(candidate)
            except nv.NVMLError:
                continue
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        try:
            return nv.nvmlDeviceGetHandleByPciBusId(pci)
        except nv.NVMLError:
            pass
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return nv.nvmlDeviceGetHandleByIndex(index)
    raise LookupError(f"cuda:{index} (uuid {uuid or '?'}) not found among NVML devices")


def other_gpu_processes(nv: Any, handle: Any) -> int:
    """Processes other than this one with a compute or graphics context on the device (NVML).

    Inside a PID namespace NVML reports host PIDs, so this process may not be recognisable by its PID; it
    then counts as one of the listed processes (it holds a context on the device it measures on).
    """
    pids: set[int] = set()
    answered = False
    for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            pids.update(int(p.pid) for p in getattr(nv, name)(handle))
            answered = True
        except (nv.NVMLError, AttributeError):
            continue
    if not answered:
        raise nv.NVMLError(nv.NVML_ERROR_NOT_SUPPORTED)
    if os.getpid() in pids:
        return len(pids) - 1
    return max(0, len(pids) - 1)


# ------------------------------------------------------------------------------------------- contention
# When a measurement counts as taken on a loaded machine (`contention_reasons`):
LOADED_RUNNABLE_EXCESS = 0.5  # other runnable tasks (median over windows) beyond the cores we leave idle
LOADED_STEAL = 0.10  # share of our CPUs' time the hypervisor gave to other guests
LOADED_OTHER_BUSY_EXCESS = 0.5  # CPU time other processes used on our CPUs, in cores, beyond the idle ones
MIN_TICKS = 50  # CPU-time figures over fewer scheduler ticks (all our CPUs together) are too coarse to judge
GPU_SLOWDOWN_REASONS = frozenset({"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                                  "hw_power_brake_slowdown"})


@dataclass(frozen=True)
class CpuSample:
    """One reading of /proc/stat and of this process, taken between timed windows (never inside one).

    ``ticks`` = (all, idle + iowait, steal) scheduler ticks summed over the CPUs this process may run on;
    ``procs_running`` counts runnable tasks of the whole machine (this reader included) and ``own_running``
    the threads of this process among them, so their difference is what other processes want to run.
    """

    time_s: float
    procs_running: int | None
    own_running: int | None
    ticks: tuple[int, int, int] | None
    own_cpu_s: float

    @property
    def runnable_other(self) -> int | None:
        if self.procs_running is None or self.own_running is None:
            return None
        return max(0, self.procs_running - self.own_running)


def _usable_cpus() -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def usable_core_count() -> int:
    """CPUs this process may run on (its affinity set; os.cpu_count() where that is unknown)."""
    cpus = _usable_cpus()
    return len(cpus) if cpus is not None else (os.cpu_count() or 1)


def _proc_stat(cpus: frozenset[int] | None) -> tuple[int | None, tuple[int, int, int] | None]:
    """(procs_running, ticks over ``cpus`` or all CPUs) from /proc/stat; Nones where it cannot be read."""
    try:
        with open("/proc/stat", "rb") as fh:
            text = fh.read()
    except OSError:
        return None, None
    running, total, per = None, None, {}
    for line in text.split(b"\n"):
        if line.startswith(b"cpu"):
            parts = line.split()
            try:
                vals = [int(v) for v in parts[1:9]] + [0] * max(0, 9 - len(parts))
            except ValueError:
                continue
            ticks = (sum(vals[:8]), vals[3] + vals[4], vals[7])
            if parts[0] == b"cpu":
                total = ticks
            elif parts[0][3:].isdigit():
                per[int(parts[0][3:])] = ticks
        elif line.startswith(b"procs_running"):
            try:
                running = int(line.split()[1])
            except (ValueError, IndexError):
                pass
    if cpus and per and not set(per) <= cpus:  # restricted to some CPUs: judge those only
        mine = [per[c] for c in cpus if c in per]
        if mine:
            total = tuple(sum(t[i] for t in mine) for i in range(3))  # type: ignore[assignment]
    return running, total


def _own_running_threads() -> int | None:
    """Threads of this process in state R (running or runnable), from /proc/self/task/*/stat."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    n = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                data = fh.read()
        except OSError:  # the thread ended meanwhile
            continue
        end = data.rfind(b")")
        if end >= 0 and data[end + 2:end + 3] == b"R":
            n += 1
    return n


def cpu_sample(cpus: frozenset[int] | None = None) -> CpuSample:
    """Read the machine's contention now (Linux /proc; the fields are None elsewhere). About 0.1 ms."""
    running, ticks = _proc_stat(cpus)
    own = _own_running_threads() if running is not None else None
    return CpuSample(time.perf_counter(), running, own, ticks, time.process_time())


def runnable_other_now() -> int | None:
    """Runnable tasks of other processes right now (machine-wide procs_running minus this process's running
    threads); None where /proc is not available."""
    return cpu_sample().runnable_other


@dataclass
class Contention(_Record):
    """How busy the machine was around one measurement's timed windows, and whether it counts as ``loaded``.

    CPU (Linux /proc; None elsewhere): ``runnable_other`` is the median over the timed windows of the
    runnable tasks of other processes (per window the mean of the samples taken right before and right
    after it), ``runnable_other_max`` the largest single sample; ``steal_fraction`` and ``other_busy_cores``
    (CPU time of other processes on our CPUs, in cores) cover the span from the first window's start to the
    last window's end over ``span_ticks`` scheduler ticks. ``threads`` = torch intra-op threads; ``threads_used``
    = cores the measurement keeps busy (the torch threads on CPU, the one launching thread on GPU);
    ``cores`` = CPUs this process may use. GPU (NVML, None without it): ``gpu_processes`` other processes on
    the device, the SM clock and the throttle reasons read during the last window.

    ``loaded`` is true when any of `contention_reasons` applies; ``reasons`` says which, in words.
    """

    loaded: bool
    reasons: list[str] = field(default_factory=list)
    threads: int = 0
    threads_used: int = 0
    cores: int = 0
    runnable_other: float | None = None
    runnable_other_max: float | None = None
    runnable_other_windows: list[float] = field(default_factory=list)
    steal_fraction: float | None = None
    other_busy_cores: float | None = None
    span_s: float | None = None
    span_ticks: int | None = None
    source: str = "/proc/stat"
    gpu_processes: int | None = None
    sm_clock_mhz: int | None = None
    max_sm_clock_mhz: int | None = None
    throttle_reasons: list[str] = field(default_factory=list)



def contention_reasons(*, runnable_other: float | None, idle_cores: float, steal_fraction: float | None = None,
                       other_busy_cores: float | None = None, span_ticks: int | None = None,
                       gpu_processes: int | None = None, throttle_reasons: Sequence[str] = ()) -> list[str]:
    """Why a measurement counts as loaded (empty: it does not). Pure; the thresholds are module constants.

    * other processes want to run more than the cores this measurement leaves idle, by at least
      `LOADED_RUNNABLE_EXCESS` (median over windows: a short-lived process at one boundary does not count);
    * they used more CPU time on our CPUs than the idle cores hold, by `LOADED_OTHER_BUSY_EXCESS` cores;
    * the hypervisor stole more than `LOADED_STEAL` of our CPUs' time;
    * (GPU) another process holds a context on the device, or its clocks are held back by a thermal, power
      brake or hardware slowdown (the routine power cap of a GPU at full load is not counted).

    The two CPU-time figures are judged only over spans of at least `MIN_TICKS` ticks (coarser is noise).
    """
    reasons = []
    if runnable_other is not None and runnable_other - idle_cores >= LOADED_RUNNABLE_EXCESS:
        reasons.append(f"{runnable_other:g} other runnable task(s) for {idle_cores:g} idle core(s)")
    reliable = span_ticks is not None and span_ticks >= MIN_TICKS
    if reliable and other_busy_cores is not None and other_busy_cores - idle_cores >= LOADED_OTHER_BUSY_EXCESS:
        reasons.append(f"other processes used {other_busy_cores:.2f} core(s) for {idle_cores:g} idle core(s)")
    if reliable and steal_fraction is not None and steal_fraction > LOADED_STEAL:
        reasons.append(f"CPU steal {steal_fraction:.0%} > {LOADED_STEAL:.0%}")
    if gpu_processes:
        reasons.append(f"{gpu_processes} other process(es) on the GPU")
    slow = [r for r in throttle_reasons if r in GPU_SLOWDOWN_REASONS]
    if slow:
        reasons.append(f"GPU clocks held back: {', '.join(slow)}")
    return reasons


class ContentionMonitor:
    """Samples contention between timed windows and judges the windows of each measurement.

    Call `sample()` before the first timed window and after every window (it returns the sample's index);
    `summary()` turns a measurement's windows, given as (before, after) index pairs, into a `Contention`.
    Interleaved measurements share the samples between their windows.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cpus = _usable_cpus()
        self.cores = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        self.samples: list[CpuSample] = []

    def sample(self) -> int:
        self.samples.append(cpu_sample(self.cpus))
        return len(self.samples) - 1

    def summary(self, windows: Sequence[tuple[int, int]], threads: int | None = None,
                telemetry: Telemetry | None = None) -> Contention:
        threads = torch.get_num_threads() if threads is None else threads
        used = threads if self.device.type == "cpu" else 1
        idle = float(max(0, self.cores - used))
        out = Contention(loaded=False, threads=threads, threads_used=used, cores=self.cores)
        if windows:
            s = self.samples
            per_window = []
            for a, b in windows:
                vals = [v for v in (s[a].runnable_other, s[b].runnable_other) if v is not None]
                if vals:
                    per_window.append(sum(vals) / len(vals))
            if per_window:
                out.runnable_other_windows = [round(v, 2) for v in per_window]
                out.runnable_other = float(statistics.median(per_window))
                idx = {i for w in windows for i in w}
                out.runnable_other_max = float(max(s[i].runnable_other or 0 for i in idx))
            first, last = s[min(a for a, _ in windows)], s[max(b for _, b in windows)]
            out.span_s = last.time_s - first.time_s
            if first.ticks is not None and last.ticks is not None:
                d_all, d_idle, d_steal = (last.ticks[i] - first.ticks[i] for i in range(3))
                out.span_ticks = d_all
                if d_all > 0:
                    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
                    out.steal_fraction = d_steal / d_all
                    busy_s = max(0, d_all - d_idle - d_steal) / hz
                    wall = d_all / hz / self.cores
                    other = max(0.0, busy_s - (last.own_cpu_s - first.own_cpu_s))
                    out.other_busy_cores = other / wall if wall > 0 else None
            if first.procs_running is None:
                out.source = "unavailable: no /proc/stat"
        else:
            out.source = "unavailable: no timed window"
        if telemetry is not None:
            out.gpu_processes = telemetry.gpu_processes
            out.sm_clock_mhz, out.max_sm_clock_mhz = telemetry.sm_clock_mhz, telemetry.max_sm_clock_mhz
            out.throttle_reasons = list(telemetry.throttle_reasons)
        out.reasons = contention_reasons(runnable_other=out.runnable_other, idle_cores=idle,
                                         steal_fraction=out.steal_fraction, other_busy_cores=out.other_busy_cores,
                                         span_ticks=out.span_ticks, gpu_processes=out.gpu_processes,
                                         throttle_reasons=out.throttle_reasons)
        out.loaded = bool(out.reasons)
        return out

