"""Timing for the benchmark scripts and the CNN comparison."""

import time

import numpy as np


def latency_ms(fn, image, runs, warmup=5):
    """Median and p90 wall time (ms) of ``fn(image)`` over ``runs`` calls after
    ``warmup``, and every call's time (``times_ms``)."""
    for _ in range(warmup):
        fn(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(image)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": round(float(np.median(times)), 3),
            "p90_ms": round(float(np.percentile(times, 90)), 3), "times_ms": times}


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine(cpuinfo="/proc/cpuinfo"):
    """This machine in one line: CPU model, the flags that decide the speed of
    oneDNN / XNNPACK kernels, and the cores this process may use (Linux)."""
    import os

    model, flags = "unknown CPU", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model}, {cores} cores, flags: {' '.join(have) or 'none of ' + ' '.join(CPU_FLAGS)}"
