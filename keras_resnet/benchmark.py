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
