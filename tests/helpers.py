"""Helpers shared by the tests: small image folders, BN statistics, script runs."""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CIFAR10 = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg")


def write_folder(root, per_class=6, size=16, classes=("cat", "dog", "eel")):
    """An image folder root/{train,test}/<class>/*.jpg|png of random pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def random_batchnorm_statistics(model, seed=0):
    """Give every BatchNorm non-trivial statistics, gamma and beta, so that an
    exported or rewritten graph has something to get wrong. (Gammas are
    non-zero: zero-init residual gammas fold into all-zero kernels, which the
    TFLite converter stores only once.)"""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.1, n).astype("float32"))
    return model


def _env(env):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}


def _run(argv, timeout, env):
    return subprocess.run([sys.executable, *argv], check=False, capture_output=True,
                          text=True, timeout=timeout, env=_env(env))


def start_python(code, *args, env=None):
    """Start ``python -c code args`` and return at once (a Popen with text pipes), for
    processes that run side by side; ``communicate()`` collects them."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(env))


def run_script(script, *args, timeout=600, env=None):
    """Run ``scripts/<script>`` in a fresh Python; returns the CompletedProcess."""
    return _run([os.path.join(ROOT, "scripts", script), *args], timeout, env)


def run_python(code, *args, timeout=600, env=None):
    """Run ``python -c code args`` in a fresh process; returns the CompletedProcess."""
    return _run(["-c", code, *args], timeout, env)


def run_main(main, *args):
    """Call a command-line entry point (``keras_resnet.cli.*_main``) in this process, as
    its script would; returns an object like ``subprocess.run``'s. Faster than a new
    Python for checks of argument handling; an uncaught exception fails the test."""
    import contextlib
    import io
    import types

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
