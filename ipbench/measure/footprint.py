"""What a timed forward needed beside its time: peak memory, the attention kernel that served it,
and how often torch.compile compiled it.

Each is measured in a forward of its own, outside the timed calls, so none of it perturbs a timing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MIB = 2**20

# torch's SDPA backends (torch.nn.attention.SDPBackend) by the number `torch._fused_sdp_choice` returns
_BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
KINETO_QUIET = "6"  # above kineto's ERROR level: nothing of its own logging reaches stderr
NVIDIA_VERSION_FILE = "/proc/driver/nvidia/version"  # the loaded kernel driver says its version here
INDUCTOR_GRAPH = "## Call CompiledFxGraph"  # the profiler's event for a call of inductor's code
NO_SDPA = "timm-eager"  # timm's attention without scaled_dot_product_attention (fused_attn off)


def peak_forward_mib(model: Callable[[Tensor], Any], batch: Tensor) -> float:
    """Peak memory one forward allocates above what was allocated before it, in MiB: activations and
    workspace, without the weights and the input batch (which every configuration shares).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU has no peak counter, and the
    process's RSS high-water mark only grows, so it would credit a configuration with an earlier
    one's peak: the CPU figure is the running sum of the allocations and frees torch's profiler
    records during the forward (``profile_memory=True``), in the order they happened. Code that
    inductor (torch.compile) generated for the CPU allocates its buffers where that record does not
    reach (a compiled DeiT-Tiny forward read 0.004 MiB): nan there, an empty cell, not a false figure.
    """
    if batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
        before = torch.cuda.memory_allocated(batch.device)
        torch.cuda.reset_peak_memory_stats(batch.device)
        model(batch)
        torch.cuda.synchronize(batch.device)
        return (torch.cuda.max_memory_allocated(batch.device) - before) / MIB
    from torch.profiler import ProfilerActivity, profile

    # kineto, which the profiler starts on first use, otherwise prints "USDT ... profiler_start/stop"
    # and, on a CUDA build without a GPU, "gpuGetDeviceCount failed" to stderr; a level set by the
    # user wins
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(batch)
    changes = []
    for event in prof.events():
        if event.name.startswith(INDUCTOR_GRAPH):
            return float("nan")
        # an op's own allocations are on its event; frees appear as "[memory]" events of their own
        delta = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if delta:
            changes.append((event.time_range.start, delta))
    current = peak = 0
    for _, delta in sorted(changes, key=lambda c: c[0]):
        current += delta
        peak = max(peak, current)
    return peak / MIB


def sdpa_backend(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                 **kwargs: Any) -> str:
    """The kernel torch's scaled_dot_product_attention picks for these inputs (flash, efficient,
    cudnn or math), under the backends enabled now: torch's own choice function, not a guess."""
    choice = torch._fused_sdp_choice(query, key, value, attn_mask, kwargs.get("dropout_p", 0.0),
                                     kwargs.get("is_causal", False), scale=kwargs.get("scale"))
    return _BACKENDS.get(int(choice), f"backend {int(choice)}")


@contextlib.contextmanager
def _recording_sdpa(found: list[str]) -> Iterator[None]:
    """Note the backend of every scaled_dot_product_attention call (timm calls it through
    torch.nn.functional, where it is replaced for the duration)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def recorded(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Tensor:
        found.append(sdpa_backend(query, key, value, attn_mask, **kwargs))
        return original(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = recorded
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def attention_backends(model: Callable[[Tensor], Any], batch: Tensor) -> str:
    """Which attention kernels served one forward, in block order without repeats ('flash',
    'flash+math': the blocks after a merge pass log(size) as a mask, which flash may not take),
    or 'timm-eager' where no block called scaled_dot_product_attention."""
    found: list[str] = []
    with _recording_sdpa(found):
        model(batch)
    return "+".join(dict.fromkeys(found)) or NO_SDPA


def _nvidia_driver() -> str:
    """The NVIDIA kernel driver's version (Linux: /proc/driver/nvidia/version), '' where unknown."""
    import re

    try:
        text = Path(NVIDIA_VERSION_FILE).read_text()
    except OSError:
        return ""
    found = re.search(r"Kernel Module(?: for \S+)?\s+([0-9][0-9.]*)", text)
    return found.group(1) if found else ""


def runtime_versions(device: str) -> dict[str, str]:
    """The CUDA runtime torch was built with, cuDNN's version and the driver's, for a CUDA device
    (a speed depends on them as much as on the GPU); empty strings on the CPU, which uses none."""
    if not device.startswith("cuda"):
        return {"cuda": "", "cudnn": "", "driver": ""}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"cuda": torch.version.cuda or "", "cudnn": "" if cudnn is None else str(cudnn),
            "driver": _nvidia_driver()}


def compile_count() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far: a difference of two
    readings is the compilations in between; more than one per configuration means recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
