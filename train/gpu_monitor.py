"""The GPU's SM clock, temperature and power while a benchmark row trains, read by `nvidia-smi
--loop-ms` in a process of its own (one reading every half second, nothing added to the
training process's work).

Rows of one invocation run one after another on the same GPU; a row that meets a warmer GPU
may run at lower clocks than the row before it, which its tokens/s alone cannot tell apart
from a slower configuration. The summary keeps the readings taken while the GPU was busy
(utilization at least BUSY percent): compiling and loading leave it idle at idle clocks.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
from typing import Optional

# (key, nvidia-smi --query-gpu field), in the order nvidia-smi prints them
FIELDS = (("utilization_pct", "utilization.gpu"), ("sm_clock_mhz", "clocks.sm"),
          ("temperature_c", "temperature.gpu"), ("power_w", "power.draw"))
BUSY = 50


def parse_reading(line: str) -> Optional[dict]:
    """One CSV line of FIELDS' values; a value nvidia-smi reports as [N/A] is None; None if the
    line is not such a reading."""
    values = [v.strip() for v in line.split(",")]
    if len(values) != len(FIELDS):
        return None
    reading: dict[str, Optional[float]] = {}
    for (key, _), value in zip(FIELDS, values):
        try:
            reading[key] = float(value)
        except ValueError:
            reading[key] = None
    return reading


def summarize(readings: list[dict]) -> Optional[dict]:
    """Over the busy readings: the SM clock's median and minimum, the highest temperature, the
    median power; with how many readings there were and how many were busy."""
    busy = [r for r in readings if (r["utilization_pct"] or 0) >= BUSY]
    if not busy:
        return {"readings": len(readings), "busy": 0} if readings else None

    def values(key):
        return [r[key] for r in busy if r[key] is not None]

    clocks, temps, power = values("sm_clock_mhz"), values("temperature_c"), values("power_w")
    return {"readings": len(readings), "busy": len(busy),
            "sm_clock_mhz_median": statistics.median(clocks) if clocks else None,
            "sm_clock_mhz_min": min(clocks) if clocks else None,
            "temperature_c_max": max(temps) if temps else None,
            "power_w_median": statistics.median(power) if power else None}


class GpuMonitor:
    """`nvidia-smi --loop-ms` on one GPU from construction to `stop()`, which returns
    `summarize` of its readings (None without nvidia-smi or readings)."""

    def __init__(self, gpu_id: str, period_ms: int = 500):
        self.readings: list[dict] = []
        self.proc = None
        if shutil.which("nvidia-smi") is None:
            return
        cmd = ["nvidia-smi", f"--id={gpu_id}", "--query-gpu=" + ",".join(f for _, f in FIELDS),
               "--format=csv,noheader,nounits", f"--loop-ms={period_ms}"]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            reading = parse_reading(line)
            if reading is not None:
                self.readings.append(reading)

    def stop(self) -> Optional[dict]:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(timeout=5)
        return summarize(self.readings)


def monitor(device) -> Optional[GpuMonitor]:
    """A GpuMonitor on a CUDA `device` (by its UUID), None elsewhere."""
    if device.type != "cuda":
        return None
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return GpuMonitor(f"GPU-{uuid}" if uuid is not None else str(device.index or 0))


def describe(summary: Optional[dict]) -> str:
    """', GPU busy: 1,755 MHz (min 1,620), 612 W, up to 63 C' for a row's line (clock and power the
    medians over the busy readings); '' without busy readings."""
    if not summary or not summary.get("busy") or summary.get("sm_clock_mhz_median") is None:
        return ""
    text = f", GPU busy: {summary['sm_clock_mhz_median']:,.0f} MHz (min {summary['sm_clock_mhz_min']:,.0f})"
    if summary.get("power_w_median") is not None:
        text += f", {summary['power_w_median']:.0f} W"
    if summary.get("temperature_c_max") is not None:
        text += f", up to {summary['temperature_c_max']:.0f} C"
    return text
