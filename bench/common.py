"""Helpers shared by the benchmark scripts: timing, copy bandwidth, peak memory, versions."""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in seconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device copy bandwidth in bytes/s: ``2 * nbytes / t`` for a ``nbytes`` copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), device, repeats, warmup=2)


def peak_extra_cuda(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def high_water_kib() -> int:
    """This process's resident-memory high-water mark (VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def reset_high_water_kib() -> int:
    """Resets the high-water mark to the current resident memory (Linux ``clear_refs`` 5), so
    that a later ``high_water_kib()`` measures the peak from here on; returns the new mark."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return high_water_kib()


def run_child(script: str, argv: list[str]) -> str:
    """Runs ``python script *argv`` in a fresh process and returns its last output line.

    For CPU peak-memory readings: a fresh process's VmHWM starts from its own baseline
    (``ru_maxrss`` would inherit the parent's peak across fork + exec), and a fixed glibc mmap
    threshold returns every large freed buffer to the OS at once, so the high-water mark measures
    live memory, not what the allocator kept cached."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, check=True, env=env
    )
    return out.stdout.strip().splitlines()[-1]


def load_file_module(package: str, relpath: str):
    """The module at ``relpath`` inside an installed ``package``, imported on its own (without
    running the package's ``__init__``, which for TRL and verl pulls in datasets / Ray that the
    GPU image lacks); None where the package or the file is absent or does not import."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], relpath)
    if not os.path.exists(path):
        return None
    name = f"_bench_{package}_{relpath.replace('/', '_').removesuffix('.py')}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as exc:
        print(f"  ({package}: {relpath} does not import here: {exc})")
        return None
    return module


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions(device: torch.device) -> dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = cpu_name()
        info["threads"] = str(torch.get_num_threads())
    return info


def device_slug(device: torch.device) -> str:
    """A file-name-friendly device name: ``nvidia_h200``, ``cpu_amd_epyc``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu " + cpu_name()
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def emit_table(table: str, out: str | None) -> None:
    """Prints a markdown table and writes it to ``out`` (folders created) when given."""
    print()
    print(table)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(table)
