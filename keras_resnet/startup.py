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


def kept_lines(text, level):
    """``text`` (what was written to stderr) without the abseil lines below ``level``
    (TF_CPP_MIN_LOG_LEVEL: 1 drops INFO, 2 also WARNING, 3 also ERROR)."""
    kept = []
    for line in text.splitlines(keepends=True):
        head = LOG_LINE.match(line)
        if head and "IWE".index(head.group(1)) < level:
            continue
        if line.startswith(NOT_INITIALIZED) and level >= 1:
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
    """
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    level = int(level) if level.isdigit() and "tensorflow" not in sys.modules else 0
    with _stderr_held_to(level):
        import keras  # noqa: F401


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
            sys.stderr.write(kept_lines(held.read().decode(errors="replace"), level))
            sys.stderr.flush()
