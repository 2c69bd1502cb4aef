"""The timing protocol's structure: interleaving, pairing, warm-up, precision. No timing is asserted.

A fake clock that only the models advance makes every timing exact and deterministic.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ipbench.measure import footprint, throughput
from ipbench.measure.throughput import SpeedResult, measure_throughput, resolve_dtype

IMAGES = torch.zeros(4, 3, 2, 2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder(nn.Module):
    """Logs each call with the state it ran in, and advances the fake clock by its cost."""

    def __init__(self, name: str, log: list[dict], clock: FakeClock | None = None, cost: float = 0.0):
        super().__init__()
        self.name, self.log, self.clock, self.cost = name, log, clock, cost
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append({
            "name": self.name,
            "inference": torch.is_inference_mode_enabled(),
            "training": self.training,
            "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
        })
        if self.clock is not None:
            self.clock.now += self.cost
        return x.flatten(1) @ self.weight.expand(x[0].numel(), 1)


def _runs(log: list[dict]) -> list[tuple[str, int]]:
    """Consecutive calls of the same model collapsed into (name, calls)."""
    runs: list[tuple[str, int]] = []
    for entry in log:
        if runs and runs[-1][0] == entry["name"]:
            runs[-1] = (entry["name"], runs[-1][1] + 1)
        else:
            runs.append((entry["name"], 1))
    return runs


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(throughput, "perf_counter", fake)
    return fake


def test_paired_ratios_medians_and_structure(clock):
    log: list[dict] = []
    # costs in powers of two: the fake clock's sums are exact
    costs = {"base": 2**-6, "fast": 2**-7, "slow": 2**-5}
    models = {name: Recorder(name, log, clock, cost) for name, cost in costs.items()}
    results = measure_throughput(models, IMAGES, baseline="base", repeats=3, min_seconds=2**-4, warmup=1)

    assert list(results) == ["base", "fast", "slow"]
    base = results["base"]
    assert base.speedup == base.speedup_min == base.speedup_max == 1.0
    assert results["fast"].speedup == 2.0 and results["slow"].speedup == 0.5
    for name, res in results.items():
        assert len(res.round_seconds) == len(res.round_ratios) == 3
        assert res.round_ratios == tuple(b / s for b, s in zip(base.round_seconds, res.round_seconds))
        assert res.speedup == statistics.median(res.round_ratios)
        ips = [4 / s for s in res.round_seconds]
        assert (res.images_per_s, res.images_per_s_min, res.images_per_s_max) == (
            statistics.median(ips), min(ips), max(ips))
        assert res.images_per_s == 4 / costs[name]
        assert (res.batch_size, res.device, res.dtype, res.baseline) == (4, "cpu", "float32", "base")
        assert not res.compiled and res.threads == torch.get_num_threads()


def test_rounds_are_interleaved_rotated_and_long_enough(clock):
    log: list[dict] = []
    costs = {"a": 2**-6, "b": 2**-7, "c": 2**-5}
    models = {name: Recorder(name, log, clock, cost) for name, cost in costs.items()}
    measure_throughput(models, IMAGES, baseline="a", repeats=3, min_seconds=2**-4, warmup=2)

    runs = _runs(log)
    warmup, rounds = runs[:3], runs[3:]
    # two warm-up calls each, then one forward for the peak memory and one for the attention kernel
    assert warmup == [("a", 2 + 2), ("b", 2 + 2), ("c", 2 + 2)]
    assert [name for name, _ in rounds] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    for name, calls in rounds:  # each timing runs for at least min_seconds, and no longer
        assert calls == math.ceil(2**-4 / costs[name])


def test_timing_runs_in_inference_mode_and_eval(clock):
    log: list[dict] = []
    model = Recorder("m", log, clock, 2**-6).train()
    measure_throughput({"m": model}, IMAGES, baseline="m", repeats=1, min_seconds=2**-5, warmup=1)
    assert all(e["inference"] and not e["training"] for e in log)
    assert all(e["autocast"] is False for e in log)


def test_timing_keeps_going_when_the_warm_up_was_misleading(clock):
    """A warm-up slower than the steady state must not cut the timing below min_seconds."""
    log: list[dict] = []
    model = Recorder("m", log, clock, 2**-3)

    def speed_up_after_warmup(done: int, total: int, what: str) -> None:
        if what.startswith("warm-up"):
            model.cost = 2**-8

    measure_throughput({"m": model}, IMAGES, baseline="m", repeats=1, min_seconds=2**-4, warmup=1,
                       progress=speed_up_after_warmup)
    timed_calls = len(log) - 1 - 2  # after the one warm-up call and the two footprint forwards
    # the calls go on until they add up to min_seconds, whatever the warm-up suggested
    assert timed_calls == 2**-4 / 2**-8


def test_progress_reports_every_step():
    log: list[dict] = []
    models = {name: Recorder(name, log) for name in ("x", "y")}
    calls: list[tuple[int, int, str]] = []
    measure_throughput(models, IMAGES, baseline="x", repeats=2, min_seconds=0.001, warmup=1,
                       progress=lambda done, total, what: calls.append((done, total, what)))
    assert [c[0] for c in calls] == list(range(1, 7))
    assert {c[1] for c in calls} == {6}
    assert calls[0][2] == "warm-up x" and calls[-1][2] == "round 2/2 x"


def test_bfloat16_runs_under_cpu_autocast():
    log: list[dict] = []
    results = measure_throughput({"m": Recorder("m", log)}, IMAGES, baseline="m", repeats=1,
                                 min_seconds=0.001, warmup=1, dtype="bf16")
    assert results["m"].dtype == "bfloat16"
    assert log and all(e["autocast"] == torch.bfloat16 for e in log)


def test_float16_on_cpu_is_a_clear_error():
    log: list[dict] = []
    with pytest.raises(ValueError, match="float16 is not supported on CPU; use bfloat16"):
        measure_throughput({"m": Recorder("m", log)}, IMAGES, baseline="m", dtype=torch.float16)
    assert log == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"baseline": "nope"}, "baseline 'nope' is not one of the models: m"),
        ({"repeats": 0}, "at least 1"),
        ({"warmup": 0}, "at least 1"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ],
)
def test_bad_arguments(kwargs, message):
    log: list[dict] = []
    args = {"baseline": "m", **kwargs}
    with pytest.raises(ValueError, match=message):
        measure_throughput({"m": Recorder("m", log)}, IMAGES, **args)
    assert log == []


def test_resolve_dtype_names():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("FP32") is torch.float32
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype(torch.float64)


def test_compile_wraps_every_model(monkeypatch):
    log: list[dict] = []
    compiled: list[nn.Module] = []

    modes: list[str] = []

    def fake_compile(model: nn.Module, mode: str) -> nn.Module:
        compiled.append(model)
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    models = {name: Recorder(name, log) for name in ("x", "y")}
    results = measure_throughput(models, IMAGES, baseline="x", repeats=1, min_seconds=0.001,
                                 warmup=1, compile=True, compile_mode="max-autotune")
    assert compiled == [models["x"], models["y"]] and modes == ["max-autotune"] * 2
    assert all(r.compiled and r.compiled_graphs == 0 and r.recompiles == 0 for r in results.values())


def test_a_real_vit_end_to_end():
    """The whole path on a tiny timm ViT and a reduced copy: results exist and are finite."""
    import copy

    import timm

    from ipbench.reducers import apply_reducer, parse_spec

    plain = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2)
    reduced = apply_reducer(copy.deepcopy(plain), parse_spec("tome:r=4"))
    results = measure_throughput({"plain": plain, "tome": reduced}, torch.randn(2, 3, 64, 64),
                                 baseline="plain", repeats=2, min_seconds=0.01, warmup=1)
    assert results["plain"].speedup == 1.0
    assert math.isfinite(results["tome"].speedup) and results["tome"].images_per_s > 0


def test_every_timed_call_is_a_latency_sample(clock):
    log: list[dict] = []
    models = {"a": Recorder("a", log, clock, 2**-6), "b": Recorder("b", log, clock, 2**-5)}
    results = measure_throughput(models, IMAGES, baseline="a", repeats=2, min_seconds=2**-3, warmup=1)
    a, b = results["a"], results["b"]
    assert a.calls == (2**-6,) * 16 and b.calls == (2**-5,) * 8  # 2 rounds of 2**-3 s each
    assert (a.latency_ms, a.latency_ms_p90) == (1000 * 2**-6, 1000 * 2**-6)
    assert (b.latency_ms, b.latency_ms_p90) == (1000 * 2**-5, 1000 * 2**-5)
    assert a.attention == b.attention == footprint.NO_SDPA  # a linear layer: no attention at all
    assert a.peak_mib >= 0 and b.peak_mib >= 0


def test_latency_median_and_p90_by_hand():
    # ten calls of 1..10 ms: median 5.5; inclusive p90 = 9 + 0.1 * (10 - 9) = 9.1
    median, p90 = throughput.latency_ms([k / 1000 for k in range(10, 0, -1)])
    assert median == pytest.approx(5.5) and p90 == pytest.approx(9.1)
    assert throughput.latency_ms([0.002]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in throughput.latency_ms([]))


def test_peak_memory_of_a_forward_on_cpu():
    x = torch.zeros(256, 1024)  # 1 MiB, allocated before: not counted
    peak = footprint.peak_forward_mib(lambda t: (t * 2).sum(), x)
    assert 1.0 <= peak < 1.001  # the 1 MiB product (and the 4-byte sum), nothing else

    def two_at_once(t: torch.Tensor) -> torch.Tensor:
        a, b = t + 1, t + 2  # both alive together: 2 MiB at the peak
        return (a * b).sum()  # a third MiB while a and b are still alive

    assert 3.0 <= footprint.peak_forward_mib(two_at_once, x) < 3.001


def test_peak_memory_is_empty_where_inductor_code_ran_on_cpu():
    # inductor's CPU buffers escape the profiler's memory record: a compiled forward would read ~0
    def compiled_like(t: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function(f"{footprint.INDUCTOR_GRAPH} fxgraphkey ##"):
            return (t * 2).sum()

    assert math.isnan(footprint.peak_forward_mib(compiled_like, torch.zeros(256, 1024)))


@pytest.mark.parametrize("line, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:29 UTC 2025", "580.65.06"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build  (dvs-builder)", "570.133.20"),
    ("something else entirely", ""),
])
def test_runtime_versions_on_cuda_name_the_driver(monkeypatch, tmp_path, line: str, version: str):
    proc = tmp_path / "version"
    proc.write_text(f"{line}\nGCC version:  gcc version 12.3.0\n")
    monkeypatch.setattr(footprint, "NVIDIA_VERSION_FILE", str(proc))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    assert footprint.runtime_versions("cuda:1") == {"cuda": "12.8", "cudnn": "91002", "driver": version}
    monkeypatch.setattr(footprint, "NVIDIA_VERSION_FILE", str(tmp_path / "absent"))
    assert footprint.runtime_versions("cuda")["driver"] == ""
    assert footprint.runtime_versions("cpu") == {"cuda": "", "cudnn": "", "driver": ""}


def test_the_attention_kernel_is_torch_own_choice():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 3, 17, 8)
    mask = torch.zeros(2, 1, 1, 17)
    with sdpa_kernel(SDPBackend.MATH):
        assert footprint.sdpa_backend(q, q, q) == "math"
        assert footprint.sdpa_backend(q, q, q, mask) == "math"
    assert footprint.sdpa_backend(q, q, q) in ("flash", "math")  # CPU: flash where the build has it

    import timm

    from ipbench.reducers import apply_reducer, parse_spec

    plain = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2)
    x = torch.randn(1, 3, 64, 64)
    with sdpa_kernel(SDPBackend.MATH):
        assert footprint.attention_backends(plain, x) == "math"  # one kernel, named once for both blocks
    plain.blocks[0].attn.fused_attn = plain.blocks[1].attn.fused_attn = False
    assert footprint.attention_backends(plain, x) == footprint.NO_SDPA
    reduced = apply_reducer(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2), parse_spec("tome:r=4"))
    with sdpa_kernel(SDPBackend.MATH):  # the log(size) mask of the second block reaches the choice too
        assert footprint.attention_backends(reduced, x) == "math"


def test_compile_count_sees_each_new_graph():
    def f(t: torch.Tensor) -> torch.Tensor:
        return t * 2 + 1

    g = torch.compile(f, backend="eager", dynamic=False)
    start = footprint.compile_count()
    g(torch.ones(3))
    assert footprint.compile_count() - start == 1
    g(torch.ones(3))  # the same shape: no new graph
    assert footprint.compile_count() - start == 1
    g(torch.ones(5))  # a new shape with dynamic=False: a recompile
    assert footprint.compile_count() - start == 2


def _rounds(name: str, seconds: list[float]) -> SpeedResult:
    return SpeedResult(name=name, images_per_s=1.0, images_per_s_min=1.0, images_per_s_max=1.0, speedup=1.0,
                       speedup_min=1.0, speedup_max=1.0, baseline="timm", round_seconds=tuple(seconds),
                       round_ratios=(), batch_size=1, device="cpu", dtype="float32", threads=1, compiled=False)


@pytest.mark.parametrize("official, ours, behind, said", [
    ([1.0] * 7, [0.9] * 7, False, "(ok)"),  # faster in every round
    ([1.0] * 7, [1.01] * 7, True, "slower in 7 of 7 rounds, sign test p = 0.008 (BEHIND)"),
    # 0.4 % behind at the median, but the rounds on both sides: level, not a verdict
    ([1.0] * 7, [1.004, 1.004, 1.004, 1.004, 0.99, 0.98, 0.99], False, "p = 0.500 (level"),
])
def test_bench_engine_says_behind_the_official_patch_only_where_the_rounds_do(official, ours, behind, said):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_engine import head_to_head
    finally:
        sys.path.pop(0)
    verdict, is_behind = head_to_head(_rounds("ours", ours), _rounds("official", official))
    assert is_behind is behind and said in verdict


def test_cpu_peak_memory_leaves_stderr_clean():
    """The profiler behind the CPU figure must not print kineto's own log lines to a user's terminal."""
    import os
    import subprocess

    code = ("import torch\nfrom ipbench.measure.footprint import peak_forward_mib\n"
            "print(peak_forward_mib(lambda t: (t * 2).sum(), torch.zeros(256, 1024)))")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 1.0 <= float(done.stdout) < 1.001
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr, done.stderr
