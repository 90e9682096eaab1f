"""`python -m train bench --longest`: the longest single row a training configuration trains at batch 1.

Each try trains one row of a given length for a few optimizer steps in the configuration's
own trainer (model, optimizer and compiled layers are built once, for every try). The length
doubles until a try runs out of GPU memory, then bisects between the longest that trained
and the shortest that did not, until they are within a given fraction of each other. A try
that runs out of memory is a result, not a crash: its gradients are dropped, the memory it
held is released, and the search goes on with a shorter row.

Every try's peak memory is recorded; with every layer checkpointed (or offloaded) and a
flash / varlen attention kernel, memory grows linearly with the length, so a straight line
through the two longest rows that trained also says where the device's full memory would
end when the search ran under a cap (`--memory-cap-gib`, which keeps the tries short).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


class LengthSearch:
    """Doubling from `start` until a try fails, then bisection until the bracket is within
    `precision` of the longest length that trained (and at least `granule` tokens wide).

    `current` is the next length to try, None once the search is over: bracketed, at the
    `ceiling`, out of `budget_s` seconds (counted from the end of the first try, which carries
    the compilation), or failing even at `granule` tokens.
    """

    def __init__(self, start: int, *, precision: float = 0.05, ceiling: int = 1 << 20, granule: int = 256,
                 budget_s: Optional[float] = None):
        if start < granule or ceiling < start:
            raise ValueError(f"the search needs granule {granule} <= start {start} <= ceiling {ceiling}")
        self.current: Optional[int] = start
        self.precision, self.ceiling, self.granule, self.budget_s = precision, ceiling, granule, budget_s
        self.longest_ok = 0
        self.shortest_failed: Optional[int] = None
        self.tries: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def record(self, ok: bool, **info) -> None:
        self.tries.append({"length": self.current, "ok": ok, **info})
        if len(self.tries) == 1:
            self.started = time.perf_counter()
        if ok:
            self.longest_ok = max(self.longest_ok, self.current)
        else:
            self.shortest_failed = min(self.shortest_failed or self.current, self.current)
        self.current = self._next()

    def _next(self) -> Optional[int]:
        if self.budget_s is not None and time.perf_counter() - self.started > self.budget_s:
            return None
        lo, hi = self.longest_ok, self.shortest_failed
        if hi is None:
            return None if lo >= self.ceiling else min(2 * lo, self.ceiling)
        if lo == 0:  # the first tries failed: halve
            nxt = self._round(hi // 2)
            return nxt if nxt >= self.granule and nxt < hi else None
        if hi - lo <= max(self.granule, self.precision * lo):
            return None
        nxt = self._round((lo + hi) // 2)
        return nxt if lo < nxt < hi else None

    def _round(self, n: int) -> int:
        return n // self.granule * self.granule

    def summary(self) -> dict[str, Any]:
        return {"longest_trained": self.longest_ok, "shortest_failed": self.shortest_failed,
                "at_ceiling": self.longest_ok >= self.ceiling, "tries": self.tries,
                "search_s": sum(t.get("seconds", 0) for t in self.tries)}


def linear_fit(tries: list[dict[str, Any]], device_gib: float) -> dict[str, Any]:
    """Bytes per token between the two longest rows that trained, and the length whose peak
    that line puts at 97% of `device_gib`."""
    ok = sorted((t["length"], t["peak_gib"]) for t in tries if t["ok"] and t.get("peak_gib"))
    if len(ok) < 2 or ok[-1][0] == ok[-2][0]:
        return {}
    (l1, p1), (l2, p2) = ok[-2], ok[-1]
    slope = (p2 - p1) / (l2 - l1)  # GiB per token
    if slope <= 0:
        return {}
    return {"bytes_per_token": slope * 2**30, "longest_fit": int(l2 + (0.97 * device_gib - p2) / slope)}


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # cuBLAS and some kernels report a failed workspace allocation as a RuntimeError
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def search_longest(trainer, search: LengthSearch, make_batch: Callable[[int], dict], *,
                   steps_per_try: int = 2, on_try: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Run `search` through `trainer`: each try is `steps_per_try` optimizer steps on
    `make_batch(length)`, whatever the trainer's dataset holds (its batches are replaced).
    `on_try()` runs after each try is recorded."""
    import torch
    from transformers import TrainerCallback

    device = trainer.args.device
    cuda = device.type == "cuda"
    if cuda:
        from train.peak_memory import PeakReader

        reader = PeakReader(device)
    real_step = trainer.training_step
    state = {"failed": None, "steps": 0, "t0": None}

    def release():
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            # pinned host blocks of offloaded activations are cached per size too, and each try has its own
            host_empty_cache = getattr(torch._C, "_host_emptyCache", None)
            if host_empty_cache is not None:
                host_empty_cache()

    def start_try():
        state.update(failed=None, steps=0, t0=time.perf_counter())
        release()
        if cuda:
            reader.restart()

    def training_step(model, inputs, num_items_in_batch=None):
        if state["failed"] is not None or search.current is None:
            return torch.zeros((), device=device)
        batch = make_batch(search.current)
        # the loss is normalised by the labelled tokens, counted as transformers' Trainer counts them
        count = (batch["labels"][..., 1:] != -100).sum().to(device)
        try:
            return real_step(model, batch, count)
        except Exception as exc:  # noqa: BLE001 -- out of memory is a result; anything else is re-raised
            if not is_out_of_memory(exc):
                raise
            state["failed"] = str(exc).splitlines()[0][:200]
        # Outside the except block: the traceback, and the activations its frames held, are gone.
        model.zero_grad(set_to_none=True)
        release()
        return torch.zeros((), device=device)

    class TryRecorder(TrainerCallback):
        def on_step_end(self, args, state_, control, **kwargs):
            state["steps"] += 1
            if state["failed"] is None and state["steps"] < steps_per_try:
                return control
            if cuda:
                torch.cuda.synchronize(device)
            ok = state["failed"] is None
            peak = reader.peak() / 2**30 if cuda and ok else None
            search.record(ok, seconds=time.perf_counter() - state["t0"], steps=state["steps"], peak_gib=peak,
                          error=state["failed"])
            log.info("longest row: %s tokens %s (%.1f s)", search.tries[-1]["length"],
                     "trained" if ok else "out of memory", search.tries[-1]["seconds"])
            if on_try is not None:
                on_try()
            if search.current is None:
                control.should_training_stop = True
            else:
                start_try()
            return control

    trainer.training_step = training_step
    trainer.add_callback(TryRecorder())
    start_try()
    trainer.train()
    result = search.summary()
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        result.update(linear_fit(result["tries"], total), device_gib=total)
    return result


def max_tries(search: LengthSearch, steps_per_try: int) -> int:
    """Optimizer steps enough for any search: doublings to the ceiling plus a bisection of the last one."""
    doublings = math.ceil(math.log2(search.ceiling / search.current)) + 1
    halvings = math.ceil(math.log2(search.ceiling / search.granule)) + 1
    return steps_per_try * (doublings + halvings)
