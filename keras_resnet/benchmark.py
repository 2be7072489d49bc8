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
    line = f"{model}, {cores} cores, flags: {' '.join(have) or 'none of ' + ' '.join(CPU_FLAGS)}"
    onednn = onednn_enabled()
    return line if onednn is None else f"{line}, oneDNN {'on' if onednn else 'off'}"


def onednn_enabled():
    """Whether TensorFlow in this process runs its oneDNN kernels; None when TensorFlow
    is not loaded (nothing is imported to find out)."""
    import sys

    if "tensorflow" not in sys.modules:
        return None
    # No public API says so; TensorFlow's own tests read it here.
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def device():
    """The accelerator training ran on (the first GPU's name), or "CPU"."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return gpus[0].device_kind if gpus else "CPU"
    from keras_resnet.training import gpu_capability

    if gpu_capability() is None:
        return "CPU"
    import tensorflow as tf

    gpu = tf.config.list_physical_devices("GPU")[0]
    return tf.config.experimental.get_device_details(gpu).get("device_name", "GPU")


def time_to_accuracy(history, targets, metric="val_accuracy"):
    """{target: {"epoch", "seconds"}} of the first epoch whose ``metric`` reached each
    target (None: not reached), from a run's history (``training.read_history``):
    its ``seconds`` column is the training wall clock at each epoch's end,
    validation included."""
    scores, seconds = history.get(metric, []), history.get("seconds", [])
    if len(seconds) != len(scores):
        raise ValueError(f"history: {metric!r} and 'seconds' columns differ in length; the "
                         "run predates the seconds column")
    out = {}
    for target in targets:
        hit = next((i for i, v in enumerate(scores) if np.isfinite(v) and v >= target), None)
        out[target] = None if hit is None else {"epoch": hit + 1,
                                                "seconds": round(float(seconds[hit]), 1)}
    return out
