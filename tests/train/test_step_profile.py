"""`python -m train bench --profile N`: each phase of a training step gets the work its own code
started, the profiled steps are warm-up steps, and a profile that cannot fit is refused."""

import gzip
import json

import pytest
import torch

from train import bench
from train.step_profile import StepProfile, category


class _Owner:
    """Stands in for the trainer: methods the profile marks as phases."""

    def __init__(self, a):
        self.a = a

    def compute_loss(self):
        return self.a @ self.a  # one matmul

    def backward(self):
        self.a @ self.a
        self.a @ self.a  # two matmuls
        return torch.relu(self.a)


def test_each_phase_gets_the_work_its_own_code_started():
    owner = _Owner(torch.randn(64, 64))
    profile = StepProfile(first=1, steps=2)
    profile._wrap(owner, "compute_loss", "forward")
    profile._wrap(owner, "backward", "backward")
    for step in range(4):
        profile.step_begins(step)  # profiles steps 1 and 2, stops as step 3 begins
        owner.compute_loss()
        owner.backward()
        profile.optimizer_begins()
        owner.a.add_(1e-3)
        profile.optimizer_ends()
        torch.zeros(8).sum()  # outside every phase: "other"
    summary = profile.summary()
    assert summary["steps"] == 2 and summary["on"] == "cpu"
    ops = {name: [k for k in summary["top"] if k["name"] == name] for name in ("aten::mm", "aten::relu")}
    assert ops["aten::mm"][0]["per_step"] == 3  # 1 forward + 2 backward, for each of the 2 steps
    phases = summary["phases"]
    assert phases["forward"]["by_category_ms"]["matmul"] > 0
    assert phases["backward"]["by_category_ms"]["matmul"] > 0
    assert "matmul" not in phases["optimizer"]["by_category_ms"] and phases["optimizer"]["work_ms"] > 0
    assert "matmul" not in phases["other"]["by_category_ms"] and phases["other"]["work_ms"] > 0
    assert phases["batch"]["host_ms"] == 0  # not marked here
    assert summary["host_ahead_ms"] is None and summary["host_ms"] <= summary["wall_ms"]


def test_a_window_that_compiles_says_it_is_not_a_steady_step():
    """A profiled step that compiles (or autotunes) is not the step a long run repeats: the profile
    gives the time that went to it and says so; the same call once compiled gives none."""
    from train.step_profile import format_profile

    torch._dynamo.reset()
    owner = _Owner(torch.randn(32, 32))
    compiled = torch.compile(lambda a: (a @ a).relu().sum())
    owner.compute_loss = lambda: compiled(owner.a)
    windows = []
    for first in (0, 1):  # step 0 compiles, step 1 runs the compiled code
        profile = StepProfile(first=first, steps=1)
        profile._wrap(owner, "compute_loss", "forward")
        for step in range(first + 2):
            profile.step_begins(step)
            owner.compute_loss()
        windows.append(profile.summary())
    cold, warm = windows
    assert cold["compile_ms"] > 0 and warm["compile_ms"] == 0
    assert cold["compile_ms"] <= cold["wall_ms"]
    assert "not a steady step" in format_profile("row", cold) and "steady" not in format_profile("row", warm)


def test_other_is_host_time_and_the_wait_for_the_queue_is_the_hosts_lead():
    """The window ends with a wait for the GPU's queue: that wait is how far the host ran ahead,
    not host time outside the phases."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    from train.step_profile import format_profile

    mm = NS(name="nvjet_sm90_tst_128x256", duration=30.0)
    events = [event("tw::step::forward", 0, 10e3, DeviceType.CPU), event("aten::mm", 1e3, 2e3, DeviceType.CPU, [mm]),
              event("tw::step::backward", 10e3, 30e3, DeviceType.CPU), event(mm.name, 5e3, 35e3, DeviceType.CUDA)]
    profile = StepProfile(first=0, steps=1)
    # the host ended its step 40 ms in; the queue it left took until 100 ms
    profile.prof, profile.host_s, profile.wall_s = NS(events=lambda: events), 0.040, 0.100
    summary = profile.summary()
    assert summary["host_ms"] == pytest.approx(40) and summary["host_ahead_ms"] == pytest.approx(60)
    assert summary["phases"]["other"]["host_ms"] == pytest.approx(10)  # 40 - (10 + 20), not 100 - 30
    assert summary["idle_ms"] == pytest.approx(70)
    assert "the host ended the window 60.0 ms of GPU work ahead" in format_profile("fastest", summary)


def test_kernel_names_fall_into_categories():
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert category("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN") == "matmul"
    assert category("triton_tem_fused_mm_0") == "matmul"
    assert category("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert category("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "triton"
    assert category("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert category("void at::native::(anonymous namespace)::fused_adam_kernel") == "other"


def event(name, start, end, device, kernels=()):
    """A profiler event as StepProfile reads it (torch's FunctionEvent), from `start` to `end` us."""
    from types import SimpleNamespace as NS

    return NS(name=name, time_range=NS(start=start, end=end, elapsed_us=lambda: end - start),
              device_type=device, is_user_annotation=False, kernels=list(kernels), self_cpu_time_total=0)


def test_kernels_are_taken_from_their_launching_op():
    """A kernel under a host range of its own name (Inductor's Triton launches) is work; an entry
    named like its op that no kernel has (the op's own CUDA time, a range's device-side copy) is not."""
    from types import SimpleNamespace as NS

    from train.step_profile import launched_kernels

    triton = NS(name="triton_poi_fused_mul_0", duration=5.0)
    mm = NS(name="nvjet_sm90_tst_128x256", duration=9.0)
    ops = [NS(name="triton_poi_fused_mul_0", kernels=[triton]),
           NS(name="aten::mm", kernels=[mm, NS(name="aten::mm", duration=9.5)]),
           NS(name="tw::step::forward", kernels=[NS(name="tw::step::forward", duration=40.0)])]
    device = [NS(name=triton.name), NS(name=mm.name)]
    got = [(op.name, k.name) for op, k in launched_kernels(ops, device)]
    assert got == [("triton_poi_fused_mul_0", "triton_poi_fused_mul_0"), ("aten::mm", "nvjet_sm90_tst_128x256")]


def test_a_kernel_linked_to_several_host_ops_is_reported_not_trusted():
    """When the profiler hangs one kernel off several host ops, the phases would count it several
    times: the summary says by how much the links exceed the device's work, and so does the text."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    from train.step_profile import format_profile

    adam = NS(name="multi_tensor_apply_kernel", duration=9.0)
    events = [event("tw::step::optimizer", 0, 10, DeviceType.CPU),
              event("aten::_fused_adamw_", 1, 2, DeviceType.CPU, [adam]),
              event("aten::copy_", 3, 4, DeviceType.CPU, [adam]),  # the same kernel, linked twice
              event("multi_tensor_apply_kernel", 5, 14, DeviceType.CUDA)]
    profile = StepProfile(first=0, steps=1)
    profile.prof, profile.wall_s = NS(events=lambda: events), 20e-6
    summary = profile.summary()
    assert summary["phases"]["optimizer"]["work_ms"] == pytest.approx(0.018)
    assert summary["overlinked_ms"] == pytest.approx(0.009 - 0.01 * 0.009)
    assert "phases unreliable" in format_profile("fastest", summary)

    events.pop(2)  # linked once: nothing to report
    summary = profile.summary()
    assert summary["overlinked_ms"] == 0 and "unreliable" not in format_profile("fastest", summary)


def test_phases_are_the_host_ranges_not_their_device_copies():
    """The device's copy of a range lags the host: a forward copy that starts inside the host's
    backward range must not make that backward's ops forward work."""
    from torch.autograd import DeviceType

    from train.step_profile import phase_windows

    events = [event("tw::step::forward", 0, 10, DeviceType.CPU), event("tw::step::backward", 10, 30, DeviceType.CPU),
              event("tw::step::forward", 12, 25, DeviceType.CUDA), event("aten::mm", 14, 15, DeviceType.CPU)]
    assert phase_windows(events) == [(0, 10, "forward"), (10, 30, "backward")]


def test_bench_profiles_the_last_warm_up_steps_of_each_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--model", "tiny", "--rows", "fastest_eager", "--steps", "6", "--warmup", "4", "--profile", "2",
                     "--n-rows", "64", "--min-len", "16", "--max-len", "48", "--json", str(out),
                     "--profile-trace", str(tmp_path / "traces"), "--workdir", str(tmp_path)])
    assert rc == 0
    result = json.loads(out.read_text())["results"][0]
    profile = result["profile"]
    assert profile["first_step"] == 1 and profile["steps"] == 2  # steps 1, 2; stopped as step 3 (warm-up) begins
    phases = profile["phases"]
    for phase in ("batch", "forward", "backward", "clip", "optimizer"):
        assert phases[phase]["host_ms"] > 0, phase  # the trainer's own methods were marked
    for phase in ("forward", "backward"):
        assert phases[phase]["by_category_ms"].get("matmul", 0) > 0, phase
        assert phases[phase]["by_category_ms"].get("attention", 0) > 0, phase
    assert phases["optimizer"]["work_ms"] > 0
    assert "profile of fastest_eager: steps 1-2" in capsys.readouterr().out
    with gzip.open(result["profile_trace"], "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"tw::step::forward", "tw::step::backward", "tw::step::optimizer"} <= names


def test_a_profile_longer_than_the_warm_up_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--warmup of at least 4"):
        bench.main(["--model", "tiny", "--rows", "fastest_eager", "--warmup", "3", "--profile", "3",
                    "--workdir", str(tmp_path)])



def test_a_row_that_ends_inside_its_profile_leaves_the_profiler_off():
    """Left on, it would record (and slow down) every later row."""
    from torch.autograd import profiler

    profile = StepProfile(first=0, steps=5)
    profile.step_begins(0)
    assert profiler._is_profiler_enabled
    profile.close()  # training stopped at step 2 of 5
    assert not profiler._is_profiler_enabled
    assert profile.summary() is None


@pytest.mark.gpu
def test_gpu_profile_places_kernels_by_their_launching_op(tmp_path):
    """On CUDA the phases hold kernels: matmuls in the forward and the backward, the optimizer's
    own, Inductor's Triton kernels of the compiled layers, and (almost) every kernel is placed
    through the op that launched it rather than by its own start."""
    out = tmp_path / "bench.json"
    rc = bench.main(["--model", "tiny", "--rows", "fastest", "--steps", "8", "--warmup", "5", "--profile", "3",
                     "--n-rows", "64", "--min-len", "16", "--max-len", "128", "--json", str(out),
                     "--workdir", str(tmp_path)])
    assert rc == 0
    profile = json.loads(out.read_text())["results"][0]["profile"]
    assert profile["on"] == "cuda" and 0 < profile["busy_ms"] <= profile["wall_ms"]
    phases = profile["phases"]
    for phase in ("forward", "backward"):
        assert phases[phase]["by_category_ms"].get("matmul", 0) > 0, phase
        assert phases[phase]["by_category_ms"].get("triton", 0) > 0, phase
    assert phases["optimizer"]["work_ms"] > 0 and "matmul" not in phases["optimizer"]["by_category_ms"]
    assert profile["unlinked_ms"] <= 0.05 * profile["busy_ms"]
