"""Interleaved throughput of several models on one fixed batch, with paired speed-up ratios.

Machines drift (thermal state, other processes, frequency scaling): on a 2-core CPU two runs of
the same model differ by 15-35 %. Timing the baseline once and each reducer later would put that
drift into the speed-up. Instead every round times every model once, back to back, in an order
rotated each round (no model always runs first or after the same neighbour), and the speed-up of
a model is the median over rounds of ``baseline time / model time`` within the same round.

Protocol (DESIGN.md): the model only, one batch already on the device, ``torch.inference_mode``,
a warm-up per model, then ``repeats`` rounds; each timing repeats the forward pass for at least
``min_seconds``, CUDA synchronised before the clock is read. Reduced precision runs through
autocast (float16/bfloat16 on CUDA, bfloat16 on CPU).

Every call is timed on its own ([choice]: synchronised after each call, so a call's time is its
latency as a caller sees it; a synchronisation costs microseconds against a forward's
milliseconds): img/s is the batch over the mean call of a round, the latency is the median and
90th percentile of all timed calls. After a model's warm-up, one more forward each measures its peak
memory, the attention kernels that served it, and what torch.compile compiled
(`ipbench.measure.footprint`), outside the timed calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ProgressFn", "SpeedProtocol", "SpeedResult", "measure_grouped", "measure_throughput",
           "precision_context", "resolve_dtype"]

DEFAULT_SPEED_GROUP = 4  # models timed per interleaved group with the baseline

ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, what)``: called after every warm-up and every timing."""

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class SpeedResult:
    """Throughput of one model over the rounds of a run, and its paired speed-up.

    ``images_per_s*`` are the median/min/max over rounds. ``speedup*`` are the median/min/max of
    the per-round ratios ``baseline seconds / model seconds`` (the baseline's own are exactly 1).
    ``round_seconds`` holds the mean seconds per batch of each round, in round order;
    ``latency_ms*`` the median and 90th percentile of every timed call; ``peak_mib`` the memory
    one forward allocates above what was allocated before it (`footprint.peak_forward_mib`);
    ``attention`` the SDPA kernels that served it; ``compiled_graphs`` the graphs torch.compile
    made in the warm-up and ``recompiles`` those it made later, in the timed rounds (static token
    counts should make that 0; both 0 without --compile).
    """

    name: str
    images_per_s: float
    images_per_s_min: float
    images_per_s_max: float
    speedup: float
    speedup_min: float
    speedup_max: float
    baseline: str
    round_seconds: tuple[float, ...]
    round_ratios: tuple[float, ...]
    batch_size: int
    device: str
    dtype: str
    threads: int
    compiled: bool
    latency_ms: float = float("nan")
    latency_ms_p90: float = float("nan")
    peak_mib: float = float("nan")
    attention: str = ""
    compiled_graphs: int = 0
    recompiles: int = 0
    calls: tuple[float, ...] = ()  # seconds of every timed call, in order


def latency_ms(calls: list[float] | tuple[float, ...]) -> tuple[float, float]:
    """Median and 90th percentile (inclusive quantiles) of per-call seconds, in milliseconds."""
    if not calls:
        return float("nan"), float("nan")
    ms = sorted(1000.0 * c for c in calls)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1] if len(ms) > 1 else ms[0]
    return statistics.median(ms), p90


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or a name ("float32", "bf16", "fp16", ...)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = _DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
        if resolved is None:
            raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {resolved}; use float32, bfloat16 or float16")
    return resolved


def precision_context(device: torch.device | str, dtype: torch.dtype | str) -> contextlib.AbstractContextManager:
    """Autocast for reduced precision (weights stay float32); ValueError where torch has none.

    float16 and bfloat16 on CUDA, bfloat16 on CPU (CPU autocast has no float16 kernels worth
    timing); float32 is a no-op context.
    """
    device, dtype = torch.device(device), resolve_dtype(dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.type == "cpu":
        raise ValueError("float16 is not supported on CPU; use bfloat16 or float32 (or a CUDA device)")
    raise ValueError(f"{dtype} is supported on cuda and cpu only, not on {device.type}")


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _rotated(names: list[str], round_index: int) -> Iterator[str]:
    """Round r starts at the r-th model: every model runs in every position equally often."""
    shift = round_index % len(names)
    yield from names[shift:] + names[:shift]


def _time_calls(
    model: Callable[[Tensor], object],
    images: Tensor,
    min_seconds: float,
    sync: Callable[[], None],
) -> list[float]:
    """Seconds of each forward, called until they add up to at least ``min_seconds`` (one at least).

    The clock is read after each call, CUDA synchronised first, so every entry is one call's latency.
    """
    calls: list[float] = []
    sync()
    elapsed = 0.0
    while not calls or elapsed < min_seconds:
        start = perf_counter()
        model(images)
        sync()
        calls.append(perf_counter() - start)
        elapsed += calls[-1]
    return calls


def measure_throughput(
    models: Mapping[str, nn.Module],
    images: Tensor,
    baseline: str,
    repeats: int = 5,
    min_seconds: float = 2.0,
    warmup: int = 2,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str = torch.float32,
    compile: bool = False,
    progress: ProgressFn | None = None,
    compile_mode: str = "default",
) -> dict[str, SpeedResult]:
    """Time every model on the same batch, interleaved, and pair each with ``baseline``.

    ``models`` maps a name to a model; they are moved to ``device`` (default: the images'
    device) and put in eval mode. ``warmup`` forward passes per model come first (with
    ``compile=True`` the first one compiles, in ``compile_mode``, so keep ``warmup >= 2``). Then
    ``repeats`` rounds: each times every model once for at least ``min_seconds``, the order
    rotated each round. Returns one :class:`SpeedResult` per model, in the order of ``models``.
    """
    from ipbench.measure import footprint

    names = list(models)
    if not names:
        raise ValueError("no models to time")
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models: {', '.join(names)}")
    if repeats < 1 or warmup < 1:
        raise ValueError("repeats and warmup must be at least 1")
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty (B, C, H, W) batch, got {tuple(images.shape)}")
    dev = torch.device(device) if device is not None else images.device
    dt = resolve_dtype(dtype)
    precision = precision_context(dev, dt)  # raises before anything moves for an unsupported pair
    sync = _synchronizer(dev)
    batch = images.to(dev)
    runners: dict[str, Callable[[Tensor], object]] = {}
    for name in names:
        model = models[name].to(dev).eval()
        runners[name] = torch.compile(model, mode=compile_mode) if compile else model

    total_steps = len(names) * (1 + repeats)
    done = 0
    seconds: dict[str, list[float]] = {name: [] for name in names}
    calls: dict[str, list[float]] = {name: [] for name in names}
    extra: dict[str, dict[str, Any]] = {}
    graphs: Callable[[], int] = footprint.compile_count if compile else lambda: 0
    with torch.inference_mode(), precision:
        for name in names:
            before = graphs()
            for _ in range(warmup):
                runners[name](batch)
            sync()
            extra[name] = {"peak_mib": footprint.peak_forward_mib(runners[name], batch),
                           "attention": footprint.attention_backends(models[name], batch),
                           "compiled_graphs": graphs() - before}
            done += 1
            if progress:
                progress(done, total_steps, f"warm-up {name}")
        recompiles = dict.fromkeys(names, 0)
        for r in range(repeats):
            for name in _rotated(names, r):
                before = graphs()
                timed = _time_calls(runners[name], batch, min_seconds, sync)
                recompiles[name] += graphs() - before
                seconds[name].append(sum(timed) / len(timed))
                calls[name].extend(timed)
                done += 1
                if progress:
                    progress(done, total_steps, f"round {r + 1}/{repeats} {name}")

    n_images = batch.shape[0]
    threads = torch.get_num_threads()
    results: dict[str, SpeedResult] = {}
    for name in names:
        ips = [n_images / s for s in seconds[name]]
        ratios = [b / s for b, s in zip(seconds[baseline], seconds[name])]
        median_ms, p90_ms = latency_ms(calls[name])
        results[name] = SpeedResult(
            name=name,
            images_per_s=statistics.median(ips),
            images_per_s_min=min(ips),
            images_per_s_max=max(ips),
            speedup=statistics.median(ratios),
            speedup_min=min(ratios),
            speedup_max=max(ratios),
            baseline=baseline,
            round_seconds=tuple(seconds[name]),
            round_ratios=tuple(ratios),
            batch_size=n_images,
            device=str(dev),
            dtype=str(dt).removeprefix("torch."),
            threads=threads,
            compiled=compile,
            latency_ms=median_ms,
            latency_ms_p90=p90_ms,
            recompiles=recompiles[name],
            calls=tuple(calls[name]),
            **extra[name],
        )
    return results


@dataclass(frozen=True)
class SpeedProtocol:
    """How throughput is timed (all of it goes into the rows and the config key)."""

    batch_size: int = 32
    repeats: int = 5
    min_seconds: float = 2.0
    warmup: int = 2
    compile: bool = False
    group: int = DEFAULT_SPEED_GROUP  # models timed with each baseline group; 0 = all in one group
    compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead | max-autotune

    def key_fields(self) -> dict[str, Any]:
        mode = {"compile_mode": self.compile_mode} if self.compile and self.compile_mode != "default" else {}
        return {"batch_size": self.batch_size, "repeats": self.repeats, "min_seconds": self.min_seconds,
                "warmup": self.warmup, "compile": self.compile, "group": self.group, **mode}


def _shifted(progress: ProgressFn, offset: int, total: int, done: int, _total: int, what: str) -> None:
    progress(offset + done, total, what)


def measure_grouped(nets: Mapping[str, nn.Module], images: Tensor, baseline: str, protocol: SpeedProtocol,
                    device: torch.device | str, dtype: torch.dtype | str,
                    progress: ProgressFn | None = None) -> dict[str, SpeedResult]:
    """Throughput of every model, interleaved with the baseline, in groups of `protocol.group` models.

    On a busy machine the speed changes within seconds; a round of 21 models lasts a minute, so a
    model and the baseline timing it is paired with would be far apart. In groups of a few models
    (a keep rate's reducers) every model is paired with a baseline timed seconds before or after.
    The baseline's own numbers pool its rounds of all groups.
    """
    others = [n for n in nets if n != baseline]
    size = protocol.group if protocol.group > 0 else max(1, len(others))
    chunks = [others[i:i + size] for i in range(0, len(others), size)] or [[]]
    total = sum((len(c) + 1) * (1 + protocol.repeats) for c in chunks)
    offset = 0
    out: dict[str, SpeedResult] = {}
    baseline_runs: list[SpeedResult] = []
    for chunk in chunks:
        res = measure_throughput(
            {baseline: nets[baseline], **{n: nets[n] for n in chunk}}, images, baseline=baseline,
            repeats=protocol.repeats, min_seconds=protocol.min_seconds, warmup=protocol.warmup, device=device,
            dtype=dtype, compile=protocol.compile, compile_mode=protocol.compile_mode,
            progress=None if progress is None else functools.partial(_shifted, progress, offset, total))
        offset += (len(chunk) + 1) * (1 + protocol.repeats)
        out.update({n: res[n] for n in chunk})
        baseline_runs.append(res[baseline])
    seconds = tuple(t for r in baseline_runs for t in r.round_seconds)
    ips = [baseline_runs[0].batch_size / t for t in seconds]
    calls = tuple(t for r in baseline_runs for t in r.calls)
    median_ms, p90_ms = latency_ms(calls)
    out[baseline] = dataclasses.replace(
        baseline_runs[0], images_per_s=statistics.median(ips), images_per_s_min=min(ips),
        images_per_s_max=max(ips), round_seconds=seconds, round_ratios=(1.0,) * len(seconds),
        calls=calls, latency_ms=median_ms, latency_ms_p90=p90_ms,
        recompiles=sum(r.recompiles for r in baseline_runs))
    return {n: out[n] for n in nets}
