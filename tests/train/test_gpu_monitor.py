"""train.gpu_monitor: nvidia-smi's readings while a row trains, summarised over the busy ones."""

from __future__ import annotations

import os
import stat
import time

import pytest

from train.gpu_monitor import GpuMonitor, describe, parse_reading, summarize


def test_readings_parse_and_summarise_over_the_busy_ones():
    assert parse_reading("97, 1755, 63, 612.40\n") == {"utilization_pct": 97.0, "sm_clock_mhz": 1755.0,
                                                       "temperature_c": 63.0, "power_w": 612.4}
    assert parse_reading("97, 1755, 63, [N/A]")["power_w"] is None
    assert parse_reading("No devices were found") is None
    readings = [parse_reading(x) for x in ("0, 345, 40, 90", "98, 1980, 55, 650", "99, 1620, 66, 700",
                                           "97, 1755, 63, [N/A]", "10, 1980, 60, 200")]
    summary = summarize(readings)
    assert summary == {"readings": 5, "busy": 3, "sm_clock_mhz_median": 1755.0, "sm_clock_mhz_min": 1620.0,
                       "temperature_c_max": 66.0, "power_w_median": 675.0}
    assert describe(summary) == ", GPU busy: 1,755 MHz (min 1,620), 675 W, up to 66 C"
    no_power = {**summary, "power_w_median": None}
    assert describe(no_power) == ", GPU busy: 1,755 MHz (min 1,620), up to 66 C"
    assert summarize([readings[0]]) == {"readings": 1, "busy": 0} and describe(summarize([readings[0]])) == ""
    assert summarize([]) is None and describe(None) == ""


def test_the_monitor_reads_nvidia_smi_until_stopped(tmp_path, monkeypatch):
    """A stand-in nvidia-smi that prints a reading every 50 ms: the monitor passes it the GPU and
    the fields, keeps what it printed until stop(), and leaves no process behind."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                    'while true; do echo "95, 1800, 50, 600"; sleep 0.05; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpu = GpuMonitor("GPU-1234", period_ms=50)
    deadline = time.time() + 10
    while len(gpu.readings) < 3 and time.time() < deadline:
        time.sleep(0.05)
    summary = gpu.stop()
    assert summary["busy"] >= 3 and summary["sm_clock_mhz_median"] == 1800.0
    assert gpu.proc.poll() is not None
    args = (tmp_path / "args").read_text().split()
    assert args[0] == "--id=GPU-1234" and "--loop-ms=50" in args
    assert args[1] == "--query-gpu=utilization.gpu,clocks.sm,temperature.gpu,power.draw"


def test_without_nvidia_smi_there_is_nothing_to_read(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    gpu = GpuMonitor("GPU-1234")
    assert gpu.proc is None and gpu.stop() is None


@pytest.mark.gpu
def test_gpu_monitor_reads_this_gpu():
    import torch

    from train.gpu_monitor import monitor

    gpu = monitor(torch.device("cuda", 0))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.time() + 3
    while time.time() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
    summary = gpu.stop()
    assert summary["readings"] >= 3 and summary["busy"] >= 1 and summary["sm_clock_mhz_median"] > 500
