"""CPU runs keep freed tensor memory in the heap instead of page-faulting fresh memory each step."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Forward and backward through a stack of MLP-sized layers: per step, the same MB-sized
# activations and gradients are allocated and freed, as in a training step on the CPU.
PROBE = r"""
import resource, sys, torch
if sys.argv[1] == "keep":
    from infer.host_memory import keep_freed_blocks
    assert keep_freed_blocks() and keep_freed_blocks()  # idempotent
torch.manual_seed(0)
torch.set_num_threads(1)  # one allocating thread: the count does not depend on which arena a worker used
layers = [torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576)] * 4
x0 = torch.randn(248, 576, requires_grad=True)
def step():
    x = x0
    for layer in layers:
        x = torch.nn.functional.silu(layer(x))
    x.sum().backward()
for _ in range(10):  # the heap grows to its high-water mark
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(60):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_steps_reuse_freed_activations_instead_of_faulting_in_fresh_pages():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, keep = faults("default"), faults("keep")
    assert default > 5000  # 60 steps of ~1.5 MB activations: thousands of fresh pages with the defaults
    assert keep < default / 5
