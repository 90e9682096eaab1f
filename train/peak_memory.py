"""Peak CUDA memory over intervals, for several readers at once.

torch keeps one peak counter per device, and `torch.cuda.reset_peak_memory_stats` resets it
for everyone: a bench recording each step's peak would erase the peaks the checkpointing
policy (train.memory_plan) learns its margin from, which then sees only the memory held at the
start of a step and stops checkpointing (1B on an H200: 13.8 GiB against a 10.3 GiB limit).
Here every reader keeps the maximum folded in before each reset, and only `restart` resets:

    reader = PeakReader(device)
    ...                       # reader.peak(): bytes allocated at most since it started
    reader.restart()          # other readers keep what they have seen
"""

from __future__ import annotations

import weakref

import torch

_readers: "weakref.WeakSet[PeakReader]" = weakref.WeakSet()


def cuda_device(device) -> torch.device:
    """`device` with its index: "cuda" and "cuda:0" name one counter and must match when folding."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def fold(device) -> None:
    """Every reader absorbs the device's peaks so far, then the counters restart
    (`device` as `cuda_device` gives it)."""
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    for reader in list(_readers):
        if reader.device == device:
            reader._folded = max(reader._folded, allocated)
            reader._folded_reserved = max(reader._folded_reserved, reserved)
    torch.cuda.reset_peak_memory_stats(device)


class PeakReader:
    def __init__(self, device):
        self.device = cuda_device(device)
        self._folded = self._folded_reserved = 0
        _readers.add(self)
        self.restart()

    def restart(self) -> None:
        fold(self.device)
        self._folded = self._folded_reserved = 0

    def peak(self) -> int:
        """Bytes allocated at most on the device since this reader (re)started."""
        return max(self._folded, torch.cuda.max_memory_allocated(self.device))

    def peak_reserved(self) -> int:
        """Bytes the caching allocator held at most since this reader (re)started."""
        return max(self._folded_reserved, torch.cuda.max_memory_reserved(self.device))
