"""The longest-row search: doubling then bisection, and through `python -m train bench --longest`
on a tiny model whose rows run out of memory past a length, in the forward or in the backward."""

from __future__ import annotations

import json

import pytest
import torch

from train.longest import LengthSearch, linear_fit, max_tries


def run_search(search: LengthSearch, fits) -> list[int]:
    tried = []
    while search.current is not None:
        tried.append(search.current)
        search.record(fits(search.current))
    return tried


def test_search_doubles_then_bisects_to_the_precision():
    search = LengthSearch(1024, precision=0.05, ceiling=1 << 20, granule=256)
    tried = run_search(search, lambda n: n <= 10_000)
    assert tried[:5] == [1024, 2048, 4096, 8192, 16384]
    assert tried[5:] == [12288, 10240, 9216, 9728, 9984]  # bisection on multiples of 256
    assert search.longest_ok == 9984 and search.shortest_failed == 10240
    assert search.shortest_failed - search.longest_ok <= 0.05 * search.longest_ok
    assert len(tried) <= max_tries(LengthSearch(1024, ceiling=1 << 20), 1)


def test_search_halves_when_the_first_try_fails_and_stops_at_the_ceiling():
    search = LengthSearch(4096, granule=256)
    assert run_search(search, lambda n: n <= 700)[:4] == [4096, 2048, 1024, 512]
    assert 512 <= search.longest_ok <= 700 < search.shortest_failed
    nothing = LengthSearch(512, granule=256)
    assert run_search(nothing, lambda n: False) == [512, 256] and nothing.longest_ok == 0
    capped = LengthSearch(1024, ceiling=3000)
    assert run_search(capped, lambda n: True) == [1024, 2048, 3000]
    assert capped.summary()["at_ceiling"] and capped.shortest_failed is None
    with pytest.raises(ValueError, match="granule"):
        LengthSearch(100, granule=256)


def test_search_stops_when_its_time_is_spent_after_the_first_try(monkeypatch):
    import train.longest

    clock = {"now": 0.0}
    monkeypatch.setattr(train.longest.time, "perf_counter", lambda: clock["now"])
    search = LengthSearch(1024, budget_s=10.0)

    def fits(n):  # the first try compiles for 100 s, each later one takes 6 s
        clock["now"] += 100.0 if n == 1024 else 6.0
        return True

    assert run_search(search, fits) == [1024, 2048, 4096]
    assert search.summary()["longest_trained"] == 4096


def test_linear_fit_extrapolates_the_two_longest_rows_that_trained():
    tries = [{"length": 1000, "ok": True, "peak_gib": 11.0}, {"length": 4000, "ok": True, "peak_gib": 12.0},
             {"length": 2000, "ok": True, "peak_gib": 11.5}, {"length": 8000, "ok": False, "peak_gib": None}]
    fit = linear_fit(tries, device_gib=100.0)
    assert fit["bytes_per_token"] == pytest.approx(0.5 / 2000 * 2**30)
    assert fit["longest_fit"] == int(4000 + (97.0 - 12.0) / (0.5 / 2000))
    assert linear_fit(tries[:1], 100.0) == {}


class OutOfMemoryPast:
    """Raises the allocator's out-of-memory error for rows longer than `limit`: in the forward of the
    model, or in the backward of its last decoder layer (after the head's gradients exist)."""

    def __init__(self, limit: int, where: str):
        self.limit, self.where, self.raised = limit, where, 0

    def install(self, model):
        from train.speed import decoder_layers

        _, layers = decoder_layers(model)
        if self.where == "forward":
            model.register_forward_pre_hook(self.forward_check, with_kwargs=True)
        else:
            layers[-1].register_full_backward_hook(self.backward_check)
        self.model = model

    def _raise(self, length):
        if length > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {length} tokens' worth")

    def forward_check(self, module, args, kwargs):
        self._raise(kwargs["input_ids"].shape[1])

    def backward_check(self, module, grad_input, grad_output):
        self._raise(grad_output[0].shape[1])


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_bench_longest_finds_where_rows_stop_fitting(where, tmp_path, monkeypatch):
    """Each row's search ends bracketing the length past which the model runs out of memory; a
    failed try leaves no gradient behind (the next try's update is the only one), and the report
    compares every row with the first."""
    import train.bench as bench

    oom = OutOfMemoryPast(3000, where)
    real_build = bench.build_trainer
    updates = []

    def build_and_break(row, ns, model, dataset, device, steps, callbacks):
        trainer = real_build(row, ns, model, dataset, device, steps, callbacks)
        oom.install(trainer.model)
        from transformers import TrainerCallback

        class GradsAtStep(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                updates.append(sum(p.grad is not None for p in model.parameters() if p.requires_grad))

        trainer.add_callback(GradsAtStep())
        return trainer

    monkeypatch.setattr(bench, "build_trainer", build_and_break)
    out = tmp_path / "longest.json"
    rc = bench.main(["--model", "tiny", "--rows", "trl_default,padding_free_sdpa", "--longest",
                     "--longest-start", "256", "--longest-max", "8192", "--longest-precision", "0.1",
                     "--json", str(out), "--workdir", str(tmp_path)])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert [r["row"] for r in res] == ["trl_default", "padding_free_sdpa"]
    for r in res:
        assert r["error"] is None
        assert r["longest_trained"] <= 3000 < r["shortest_failed"]
        assert r["shortest_failed"] - r["longest_trained"] <= max(256, 0.1 * r["longest_trained"])
        lengths = [t["length"] for t in r["tries"]]
        assert lengths[:5] == [256, 512, 1024, 2048, 4096]
        failed = [t for t in r["tries"] if not t["ok"]]
        assert failed and all("out of memory" in t["error"] for t in failed)
        assert all(t["steps"] == 2 for t in r["tries"] if t["ok"]) and all(t["steps"] == 1 for t in failed)
    assert oom.raised == sum(len([t for t in r["tries"] if not t["ok"]]) for r in res)
    # a step whose micro-batch ran out of memory reaches the optimizer with no gradient at all
    n_trainable = max(updates)
    assert sorted(set(updates)) == [0, n_trainable]
    assert updates.count(0) == oom.raised
