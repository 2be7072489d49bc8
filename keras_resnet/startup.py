"""What must happen before Keras (and TensorFlow) load: the environment TensorFlow
reads once, and its start-up log lines held to ``TF_CPP_MIN_LOG_LEVEL``.

``keras_resnet/__init__.py`` imports this first, then Keras through ``import_keras``.
"""

import contextlib
import os
import re
import sys
import tempfile

# Quiet TensorFlow's C++ start-up logging unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX512-VNNI,
# AVX512-BF16 or AMX; on others (the AVX2-only EPYC) convolutions run on Eigen kernels
# built without AVX2 / FMA, and ResNet18 trained 2.5x slower (docs/benchmarks.md).
# TensorFlow reads this once as it loads: import keras_resnet before keras / tensorflow.
# A value the user set wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# An abseil log line: severity letter (I, W, E: levels 0, 1, 2), MMDD, time, thread,
# file:line].
LOG_LINE = re.compile(r"([IWE])\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
NOT_INITIALIZED = "WARNING: All log messages before absl::InitializeLog() is called"
# A LiteRT (TFLite) log line: "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.".
LITERT_LINE = re.compile(r"(INFO|WARNING|ERROR): ")
# The TFLite converter prints its quantisation settings on every quantised conversion,
# with no severity ("fully_quantize: 0, inference_type: 6, ..."): an INFO line in all
# but name.
QUANTIZER_SETTINGS = "fully_quantize: "
# TensorFlow's Linux wheel is built with CUDA and calls cuInit on every machine, then logs
# the failure as an ERROR ("failed call to cuInit: ... UNKNOWN ERROR (303)"). Without an
# NVIDIA driver that failure says only "no GPU here", which TensorFlow already said.
CUINIT_FAILED = "failed call to cuInit"
NVIDIA_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg")  # Linux, WSL


def has_nvidia_driver():
    """Whether this machine has an NVIDIA driver that a CUDA program could reach."""
    return any(os.path.exists(path) for path in NVIDIA_DRIVER_PATHS)


def kept_lines(text, level, nvidia_driver=True):
    """``text`` (what was written to stderr) without the abseil and LiteRT lines below
    ``level`` (TF_CPP_MIN_LOG_LEVEL: 1 drops INFO, 2 also WARNING, 3 also ERROR), and,
    from level 1 on, without the cuInit failure on a machine with no ``nvidia_driver``
    and the converter's quantisation settings."""
    kept = []
    for line in text.splitlines(keepends=True):
        head = LOG_LINE.match(line) or LITERT_LINE.match(line)
        if head and "IWE".index(head.group(1)[0]) < level:
            continue
        if level >= 1 and (line.startswith((NOT_INITIALIZED, QUANTIZER_SETTINGS)) or (
                head and not nvidia_driver and CUINIT_FAILED in line)):
            continue
        kept.append(line)
    return "".join(kept)


def import_keras():
    """``import keras``, with TensorFlow's start-up lines held to TF_CPP_MIN_LOG_LEVEL.

    TensorFlow 2.21 logs "oneDNN custom operations are on" and "Could not find cuda
    drivers" before its logging reads TF_CPP_MIN_LOG_LEVEL (abseil writes everything
    before ``absl::InitializeLog()``; abseil-cpp pull request 1957), six lines on every
    command, ``--help`` included. No setting stops them, so stderr is held in a file
    while Keras (and with it TensorFlow) loads and written back without them; every
    other line, a traceback included, is written back as it came. A process that dies
    in the import itself (an abort in C++) loses what was held: TF_CPP_MIN_LOG_LEVEL=0
    holds nothing and shows everything.

    With the TensorFlow backend its devices are listed inside the hold too (1 ms): that
    is where TensorFlow calls cuInit, whose failure without a driver is dropped.
    """
    with _stderr_held_to(_hold_level()):
        import keras

        if keras.backend.backend() == "tensorflow":
            _list_tensorflow_devices()


def import_tensorflow():
    """``import tensorflow`` under another Keras backend, its start-up lines held as in
    ``import_keras``. Call it before Keras would import TensorFlow itself (under JAX,
    ``keras.utils.set_random_seed`` does wherever it is installed)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _stderr_held_to(_hold_level()):
        return _list_tensorflow_devices()


def litert_lines_held():
    """A block whose LiteRT and TFLite-converter lines are held to TF_CPP_MIN_LOG_LEVEL.

    LiteRT logs through TFLite's own logger ("INFO: Created TensorFlow Lite XNNPACK
    delegate for CPU." when an interpreter first allocates), which neither that variable
    nor any Python call quiets (tensorflow/tensorflow issue 58050); the converter prints
    its quantisation settings. Every other line is written back as it came.
    """
    return _stderr_held_to(_log_level())


def _log_level():
    """TF_CPP_MIN_LOG_LEVEL as a number (0 where unset or not a number)."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    return int(level) if level.isdigit() else 0


def _hold_level():
    """TF_CPP_MIN_LOG_LEVEL as a number; 0 (hold nothing) once TensorFlow has loaded,
    when its own logging reads the level."""
    return _log_level() if "tensorflow" not in sys.modules else 0


def _list_tensorflow_devices():
    """Import TensorFlow and list its physical devices: where it calls cuInit. Only
    the physical ones, so device and threading settings can still be made after."""
    import tensorflow as tf

    tf.config.list_physical_devices()
    return tf


@contextlib.contextmanager
def _stderr_held_to(level):
    """Hold what is written to fd 2 inside the block; write back ``kept_lines``.
    Level 0 (or no stderr to hold) holds nothing."""
    try:
        saved = os.dup(2) if level >= 1 else None
    except OSError:
        saved = None
    if saved is None:
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            sys.stderr.write(kept_lines(held.read().decode(errors="replace"), level,
                                        has_nvidia_driver()))
            sys.stderr.flush()
