"""Energy a run draws from its GPUs, read from the devices' own counters on logging steps (never on other steps).

NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver loaded; Volta and
newer) is read through pynvml where the device has it; elsewhere the power draw (`torch.cuda.power_draw`) sampled at
each reading is integrated over time, a coarse figure when readings are far apart. CPUs have no such reading: the
meter then reads None and a run logs no energy. Ranks add their readings on the host (`total_over_ranks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a dependency, but a CPU-only install may lack it
    pynvml = None


class PowerIntegral:
    """Joules from power samples (time in seconds, power in watts) by the trapezoid rule between samples."""

    def __init__(self) -> None:
        self.joules = 0.0
        self._last: tuple[float, float] | None = None

    def add(self, seconds: float, watts: float) -> float:
        """Add a sample; returns the joules since the first one."""
        if self._last is not None:
            t0, w0 = self._last
            self.joules += (seconds - t0) * (w0 + watts) / 2
        self._last = (seconds, watts)
        return self.joules


def counter_joules(start_millijoules: int, now_millijoules: int) -> float:
    """Joules between two readings of NVML's total-energy counter (millijoules)."""
    return (now_millijoules - start_millijoules) / 1000.0


def _nvml_energy(device: torch.device) -> Callable[[], int] | None:
    """A reader of NVML's energy counter (millijoules) for `device`, or None where NVML or the counter is absent."""
    if pynvml is None or device.type != "cuda":
        return None
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises NVMLError_NotSupported on older GPUs
    except Exception:  # NVMLError (no driver library, unsupported device) or a device torch cannot describe
        return None
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)


class EnergyMeter:
    """Joules this process's device has drawn since the meter was made; `read` returns None on CPUs."""

    def __init__(self, device: torch.device):
        self.device = device
        self._counter = _nvml_energy(device)
        self._start = self._counter() if self._counter is not None else 0
        self._power: PowerIntegral | None = None
        watts = self._power_watts() if self._counter is None and device.type == "cuda" else None
        if watts is not None:
            self._power = PowerIntegral()
            self._power.add(time.monotonic(), watts)

    def _power_watts(self) -> float | None:
        try:
            return torch.cuda.power_draw(self.device) / 1000.0
        except Exception:  # no NVML behind torch, or a device that does not report its power
            return None

    @property
    def kind(self) -> str | None:
        """What the readings come from: "nvml-energy", "power-draw", or None (no reading)."""
        return "nvml-energy" if self._counter is not None else "power-draw" if self._power is not None else None

    def read(self) -> float | None:
        """Joules since the meter was made (a host call to the driver: no device sync)."""
        if self._counter is not None:
            return counter_joules(self._start, self._counter())
        if self._power is not None:
            watts = self._power_watts()
            return self._power.add(time.monotonic(), watts) if watts is not None else self._power.joules
        return None


def rank_reading(joules: float | None) -> tuple[float, float]:
    """What a rank contributes to the sum over ranks: its joules (0 when unknown) and 1 when it has no reading."""
    return (0.0, 1.0) if joules is None else (float(joules), 0.0)


def total_over_ranks(summed: tuple[float, float] | list[float]) -> float | None:
    """The summed `rank_reading`s as the run's joules, or None when any rank had no reading (a partial sum would
    understate the run)."""
    joules, missing = summed
    return None if missing else joules
