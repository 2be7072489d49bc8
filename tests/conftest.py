import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX's persistent compilation cache, shared by every JAX process the suite starts:
# programs they share (initialisers, the same steps in a rerun) then compile once.
JAX_CACHE = tempfile.mkdtemp(prefix="keras_resnet_jax_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")  # small ones too
sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers

import keras_resnet  # noqa: F401  before TensorFlow loads, as in the scripts: oneDNN on

# isort: split
import keras
import pytest

# Module fixtures that take a training run or an export each: the tests using one of them
# run in one pytest-xdist worker (``--dist loadgroup``), so it is made once, not per worker.
SHARED_FIXTURES = ("exported", "finished", "pretrained_run")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        for name in SHARED_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{name}"))


@pytest.fixture(autouse=True)
def fresh_keras_state():
    """Every test starts from seed 0 and the float32 policy, and leaves them so:
    results do not depend on which tests ran before."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    # Without its gc.collect(): 0.2 s a test with TensorFlow loaded, 5 % of the suite;
    # Python's own collector still runs (largest process 3.3 -> 4.2 GB of RSS, of 24).
    keras.utils.clear_session(free_memory=False)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(JAX_CACHE, ignore_errors=True)
