"""GPU telemetry through NVML (identity, clocks, power, temperature, throttle reasons, energy), CPU fallback.

Every throughput result carries one `Telemetry` record so that a number can be judged later: which GPU and
driver, at what clocks and temperature, whether the clocks were being held back, and how much energy the
timed windows used. NVML is optional: on CPU, or when NVML (``pynvml``, package nvidia-ml-py) is missing or
fails, the record still names the device, the torch thread count and the CPU model, and ``nvml_error`` says
why there is no GPU data. Nothing here raises because NVML is absent or a query is unsupported.
"""
from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch

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


@dataclass
class Telemetry:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Telemetry":
        """Rebuild from `to_dict()` output; keys this version does not know (newer records) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


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
            self.error = f"total energy counter: {_one_line(exc)}"
        try:
            self._samples = [(time.perf_counter(), self._power_w())]
        except self._nvml.NVMLError as exc:
            self.error = f"{self.error}; power usage: {_one_line(exc)}"
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
                self.error, self.method = f"total energy counter: {_one_line(exc)}", None
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
            self.nvml_error = f"pynvml not importable (install nvidia-ml-py): {_one_line(exc)}"
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.nvml_error = f"nvmlInit failed: {_one_line(exc)}"
            return self
        self._initialised = True
        try:
            self._handle = _nvml_handle(pynvml, self.device.index or 0)
            self._nvml = pynvml
        except (pynvml.NVMLError, LookupError, RuntimeError) as exc:
            self.nvml_error = f"no NVML handle for {self.device}: {_one_line(exc)}"
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
