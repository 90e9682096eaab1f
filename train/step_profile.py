"""Where a training step's time goes: `python -m train bench --profile N`.

torch.profiler records N optimizer steps at the end of a row's warm-up (the timed steps run
unprofiled). Each step is cut into the phases the Trainer runs in order, marked with
`record_function` ranges around the trainer's own methods:

    batch      get_batch_samples: the next step's micro-batches from the data loader (collation)
    forward    compute_loss: the forward and the loss head (TRL's metrics included)
    backward   accelerator.backward (recomputation of checkpointed layers included)
    clip       the gradient norm and its clipping
    optimizer  optimizer.step
    other      everything else: zero_grad, the scheduler, logging, callbacks, the NaN check

A kernel counts toward the phase whose host code launched it (the op that launched it, on
whichever thread, started inside that phase's range), so a phase's device time is the GPU work
it queued, whenever that ran. Busy is the union of the kernels' intervals; idle is the rest of
the wall time, what host-side waits and launches cost the GPU. On the CPU there are no kernels:
an op's own (self) time stands for its work.

The profiler's own per-op cost lengthens the host side of the profiled steps: idle time here is
an upper bound of the unprofiled steps' idle time. So is the window's start: the profile begins
with the GPU's queue drained (a synchronize), so the GPU waits for the first profiled step's
first launches, which in unprofiled training the host queues while the GPU is still busy with
the step before. `host_ahead_ms` is how much queued GPU work the host had left behind when it
finished the last profiled step: above zero, the host outran the GPU, the steps were GPU-bound,
and their idle time is mostly that start's. "other" is the host's time outside the phases up to
that point, without the wait for the queue at the window's end.
"""

from __future__ import annotations

import bisect
import re
import time

from transformers import TrainerCallback

PHASES = ("batch", "forward", "backward", "clip", "optimizer", "other")
_PREFIX = "tw::step::"
# every compile and autotuning range torch times (`dynamo_timed`) carries this in its name
_COMPILING = "(dynamo_timed)"

# Kernel (or CPU op) name -> what it is. First match wins; names are cuBLAS / CUTLASS / cuDNN,
# PyTorch's flash and varlen attention, Inductor's Triton kernels, and ATen's own.
CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|attention|attn|varlen", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|wgmma|triton_tem_|\baten::(mm|addmm|bmm|linear|_int_mm)\b", re.I)),
    ("copy", re.compile(r"memcpy|memset|aten::(copy_|to|_to_copy)\b", re.I)),
    ("triton", re.compile(r"^triton_|cpp_fused", re.I)),
)


def category(name: str) -> str:
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


class StepProfile:
    """Profile `steps` optimizer steps starting at global step `first`: `install(trainer)`
    before `trainer.train()`, then `summary()`."""

    def __init__(self, first: int, steps: int):
        if first < 0 or steps < 1:
            raise ValueError(f"profile: needs at least one step from step 0 on (first={first}, steps={steps})")
        self.first, self.steps = first, steps
        self.prof = None
        self.wall_s = None
        self.host_s = None  # from the window's start until the host ends its last profiled step
        self._t0 = 0.0
        self._optimizer_range = None

    @property
    def active(self) -> bool:
        return self.prof is not None and self.wall_s is None

    def install(self, trainer) -> None:
        """Mark the phases on `trainer` (instance attributes over its methods) and add the
        callback that starts and stops the profiler at step boundaries."""
        self._wrap(trainer, "get_batch_samples", "batch")
        self._wrap(trainer, "compute_loss", "forward")
        self._wrap(trainer.accelerator, "backward", "backward")
        self._wrap(trainer, "_clip_grad_norm", "clip")
        trainer.add_callback(_Boundaries(self))

    def _wrap(self, owner, method: str, phase: str) -> None:
        inner = getattr(owner, method, None)
        if inner is None:  # a Trainer without this method: its time stays under "other"
            return

        def marked(*args, **kwargs):
            if not self.active:
                return inner(*args, **kwargs)
            with _range(phase):
                return inner(*args, **kwargs)

        setattr(owner, method, marked)

    # ---- called by the callback ---------------------------------------------------------
    def step_begins(self, step: int) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if step == self.first and self.prof is None:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            self._t0 = time.perf_counter()
        elif step == self.first + self.steps and self.active:
            self.host_s = time.perf_counter() - self._t0
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.wall_s = time.perf_counter() - self._t0
            self.prof.__exit__(None, None, None)

    def close(self) -> None:
        """Stop the profiler if training ended before the last profiled step (an error, a short
        run): left on, it would record every later row. Its partial record is dropped."""
        if self.active:
            self.prof.__exit__(None, None, None)
            self.prof = None

    def optimizer_begins(self) -> None:
        if self.active:
            self._optimizer_range = _range("optimizer")
            self._optimizer_range.__enter__()

    def optimizer_ends(self) -> None:
        if self._optimizer_range is not None:
            self._optimizer_range.__exit__(None, None, None)
            self._optimizer_range = None

    # ---- the result ---------------------------------------------------------------------
    def export_trace(self, path: str) -> bool:
        """The profiled steps as a Chrome / Perfetto trace (gzip-compressed when `path` ends in
        .gz), phases included as ranges; False when the profiled steps did not all run."""
        if self.wall_s is None:
            return False
        self.prof.export_chrome_trace(path)
        return True

    def summary(self, top: int = 12) -> dict | None:
        """Per step: wall, device busy and idle time, each phase's host and device time by
        category, and the largest kernels. None when the profiled steps did not all run."""
        if self.wall_s is None:
            return None
        from torch.autograd import DeviceType

        events = list(self.prof.events())
        windows = phase_windows(events)
        starts = [w[0] for w in windows]

        def phase_at(t: float) -> str:
            i = bisect.bisect_right(starts, t) - 1
            return windows[i][2] if i >= 0 and t <= windows[i][1] else "other"

        cpu = [e for e in events if e.device_type == DeviceType.CPU]
        # Device-side copies of host ranges (record_function, Optimizer.step#...) are not work.
        device = [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]
        unlinked_us = overlinked_us = 0.0
        if device:  # kernels: their own duration, in the phase of the op that launched them
            work = [(k.name, k.duration, phase_at(op.time_range.start)) for op, k in launched_kernels(cpu, device)]
            total_us = sum(k.time_range.elapsed_us() for k in device)
            linked_us = sum(us for _, us, _ in work)
            unlinked_us = max(0.0, total_us - linked_us)
            # More linked than run: some kernels hang off several host ops (the profiler's
            # correlation of ops and kernels went wrong), so the phase split overstates.
            overlinked_us = max(0.0, linked_us - 1.01 * total_us)
            busy_us = _union(sorted((k.time_range.start, k.time_range.end) for k in device))
        else:  # CPU ops: their own time
            work = [(e.name, e.self_cpu_time_total, phase_at(e.time_range.start))
                    for e in events if e.device_type == DeviceType.CPU and not e.name.startswith(_PREFIX)]
            busy_us = sum(us for _, us, _ in work)

        n = self.steps
        # Compiling and autotuning inside the window (every range torch times as `dynamo_timed`):
        # a step that pays them is not the step a long run repeats.
        compile_us = _union(sorted((e.time_range.start, e.time_range.end) for e in cpu if _COMPILING in e.name))
        phases = {p: {"host_ms": 0.0, "work_ms": 0.0, "by_category_ms": {}} for p in PHASES}
        for start, end, phase in windows:
            phases[phase]["host_ms"] += (end - start) / 1e3 / n
        kernels: dict[str, list] = {}
        for name, us, phase in work:
            cats = phases[phase]["by_category_ms"]
            cat = category(name)
            cats[cat] = cats.get(cat, 0.0) + us / 1e3 / n
            phases[phase]["work_ms"] += us / 1e3 / n
            entry = kernels.setdefault(name, [0.0, 0, cat])
            entry[0] += us / 1e3 / n
            entry[1] += 1
        wall_ms = self.wall_s * 1e3 / n
        host_s = self.wall_s if self.host_s is None else self.host_s
        host_ms = host_s * 1e3 / n
        phases["other"]["host_ms"] = max(0.0, host_ms - sum(p["host_ms"] for p in phases.values()))
        busy_ms = busy_us / 1e3 / n
        largest = sorted(kernels.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
        return {
            "steps": n, "first_step": self.first, "on": "cuda" if device else "cpu",
            "wall_ms": wall_ms, "busy_ms": busy_ms, "idle_ms": max(0.0, wall_ms - busy_ms) if device else None,
            "host_ms": host_ms, "host_ahead_ms": max(0.0, self.wall_s - host_s) * 1e3 if device else None,
            "kernels_per_step": len(work) / n, "unlinked_ms": unlinked_us / 1e3 / n,
            "overlinked_ms": overlinked_us / 1e3 / n, "compile_ms": compile_us / 1e3 / n,
            "phases": {p: _rounded(v) for p, v in phases.items()},
            "top": [{"name": name[:90], "ms": round(ms, 4), "per_step": count / n, "category": cat}
                    for name, (ms, count, cat) in largest],
        }


def phase_windows(events: list) -> list[tuple[float, float, str]]:
    """(start, end, phase) of the host's phase ranges, in order of start.

    Only the host's: the profiler also lists each range's copy on the device timeline, which
    lags the host (by a whole phase when the host runs ahead), and would claim the host ops of a
    later phase for an earlier one."""
    from torch.autograd import DeviceType

    return sorted((e.time_range.start, e.time_range.end, e.name[len(_PREFIX):])
                  for e in events if e.name.startswith(_PREFIX) and e.device_type == DeviceType.CPU)


def launched_kernels(cpu_ops: list, kernels: list) -> list[tuple]:
    """(op, kernel) for every kernel the profiler lists on the host op that launched it.

    The profiler fills each op's `kernels` through the launch's correlation id, in every torch
    version. An entry named like the op is the op's own CUDA time or its range's device-side
    copy, unless a kernel (of `kernels`, the device's events) has that name: Inductor launches
    each Triton kernel inside a host range named after it."""
    kernel_names = {k.name for k in kernels}
    return [(op, k) for op in cpu_ops for k in op.kernels if k.name != op.name or k.name in kernel_names]


def _range(phase: str):
    from torch.profiler import record_function

    return record_function(_PREFIX + phase)


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in intervals:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _rounded(phase: dict) -> dict:
    return {"host_ms": round(phase["host_ms"], 3), "work_ms": round(phase["work_ms"], 3),
            "by_category_ms": {k: round(v, 3) for k, v in sorted(phase["by_category_ms"].items(), key=lambda kv: -kv[1])}}


class _Boundaries(TrainerCallback):
    def __init__(self, profile: StepProfile):
        self.profile = profile

    def on_step_begin(self, args, state, control, **kwargs):
        self.profile.step_begins(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.profile.optimizer_begins()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.profile.optimizer_ends()


def format_profile(row: str, p: dict) -> str:
    """The profile as a few lines of text: per phase host and device ms per step, by category."""
    unit = "GPU" if p["on"] == "cuda" else "CPU op"
    head = (f"profile of {row}: steps {p['first_step']}-{p['first_step'] + p['steps'] - 1}, "
            f"{p['wall_ms']:.1f} ms per step, {unit} work {p['busy_ms']:.1f} ms")
    if p["idle_ms"] is not None:
        head += f", GPU idle {p['idle_ms']:.1f} ms ({100 * p['idle_ms'] / p['wall_ms']:.1f}%)"
    if p.get("host_ahead_ms") is not None:
        head += f"; the host ended the window {p['host_ahead_ms']:.1f} ms of GPU work ahead"
    if p.get("unlinked_ms"):
        head += f" ({p['unlinked_ms']:.2f} ms of kernels in no phase: no launching op recorded)"
    if p.get("overlinked_ms"):
        head += (f" (phases unreliable: {p['overlinked_ms']:.2f} ms more kernel time linked to host ops "
                 "than the device ran)")
    if p.get("compile_ms"):
        head += (f" -- not a steady step: {p['compile_ms']:.1f} ms of it compiled or autotuned"
                 " (profile later steps: a longer --warmup)")
    cats = ["matmul", "attention", "triton", "copy", "other"]
    lines = [head, f"  {'phase':10} {'host ms':>8} {unit + ' ms':>9} " + " ".join(f"{c:>9}" for c in cats)]
    for name, ph in p["phases"].items():
        by = ph["by_category_ms"]
        lines.append(f"  {name:10} {ph['host_ms']:8.2f} {ph['work_ms']:9.2f} "
                     + " ".join(f"{by.get(c, 0.0):9.2f}" for c in cats))
    lines.append("  largest: " + "; ".join(f"{k['name'][:48]} {k['ms']:.2f} ms x{k['per_step']:g}" for k in p["top"][:5]))
    return "\n".join(lines)
